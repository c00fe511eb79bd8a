//! The upsampler's config: the committed configs parse, bad ones fail naming the key, and the
//! conditioning's corruption behaves as configured.
use std::path::Path;

use tch::{Device, Kind, Tensor};
use unclip_train::config::parse_config;
use unclip_upsampler::low_res::{downsample, LowResConfig};
use unclip_upsampler::task::UpsamplerTrainConfig;

const BASE: &str = "
upsampler:
  model: {block_out_channels: [16, 32], layers_per_block: 1, norm_num_groups: 4}
  low_res: {resolution: 16, blur: {kernel: 3, sigma: 0.6}}
  crop: 16
data: {train: a.tar, held_out: b.tar, image: {resolution: 32}}
train: {steps: 10, batch_size: 4}
";

fn parse(sets: &[&str]) -> anyhow::Result<UpsamplerTrainConfig> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Ok(parse_config::<UpsamplerTrainConfig>(BASE, &sets)?.task)
}

#[test]
fn committed_configs_parse_and_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // The paper's sizes (unCLIP Table 3): ~700 M and ~300 M parameters.
    for (file, low, high, blur, bsr, params) in [
        (
            "configs/shapes/upsampler.yaml",
            32,
            64,
            true,
            false,
            1e5..1e7,
        ),
        (
            "configs/paper/upsampler-256.yaml",
            64,
            256,
            true,
            false,
            650e6..750e6,
        ),
        (
            "configs/paper/upsampler-1024.yaml",
            256,
            1024,
            false,
            true,
            250e6..330e6,
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let cfg = parse_config::<UpsamplerTrainConfig>(&text, &[])
            .unwrap_or_else(|e| panic!("{file}: {e:#}"))
            .task;
        assert_eq!(cfg.upsampler.low_res.resolution, low, "{file}");
        assert_eq!(cfg.resolution(), high, "{file}");
        assert_eq!(cfg.upsampler.low_res.blur.is_some(), blur, "{file}");
        assert_eq!(cfg.upsampler.low_res.bsr.is_some(), bsr, "{file}");
        // SPEC: trained on crops a quarter of the target side.
        assert_eq!(cfg.train_side() * 4, high, "{file}");
        let n = cfg.upsampler.model.parameter_count() as f64;
        assert!(params.contains(&n), "{file}: {n} parameters");
    }
}

#[test]
fn bad_configs_fail_naming_the_key() {
    parse(&[]).unwrap();
    for (sets, expect) in [
        (
            vec!["upsampler.low_res.resolution=12"],
            "upsampler.low_res.resolution",
        ),
        (
            vec!["upsampler.low_res.resolution=32"],
            "upsampler.low_res.resolution",
        ),
        (
            vec!["upsampler.low_res.bsr={scale: 2}"],
            "set blur or bsr, not both",
        ),
        (
            vec![
                "upsampler.low_res.blur=null",
                "upsampler.low_res.bsr={scale: 4}",
            ],
            "upsampler.low_res.bsr.scale",
        ),
        (
            vec!["upsampler.low_res.blur.kernel=4"],
            "upsampler.low_res.blur.kernel",
        ),
        (vec!["upsampler.crop=15"], "upsampler.crop"),
        (vec!["upsampler.crop=64"], "upsampler.crop"),
        (
            vec![
                "data.image.resolution=51",
                "upsampler.low_res.resolution=17",
            ],
            "data.image.resolution",
        ),
        (
            vec!["upsampler.model.out_channels=3"],
            "upsampler.model.out_channels must be 6",
        ),
        (
            vec!["upsampler.model.norm_num_groups=5"],
            "multiple of norm_num_groups",
        ),
        (
            vec!["upsampler.sampling={sampler: ddim, steps: ddim2000}"],
            "upsampler.sampling.steps",
        ),
        (vec!["data.image.normalize=clip"], "data.image.normalize"),
        (vec!["samples.count=0"], "samples.count"),
        (vec!["upsampler.low_res.blurr=1"], "blurr"),
    ] {
        let err = format!("{:#}", parse(&sets).unwrap_err());
        assert!(err.contains(expect), "{sets:?}: {err}");
    }
    // Fixed variances take 3 output channels.
    parse(&[
        "upsampler.model.out_channels=3",
        "upsampler.diffusion={variance: fixed_small, loss: mse}",
    ])
    .unwrap();
}

fn images() -> Tensor {
    tch::manual_seed(3);
    // Smooth enough that a blur moves little, sharp enough that it moves something.
    Tensor::rand([3, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0
}

fn low_res(yaml: &str) -> LowResConfig {
    let cfg: LowResConfig = serde_yaml::from_str(yaml).unwrap();
    cfg.validate(32).unwrap();
    cfg
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn clean_conditioning_is_the_area_downsampling() {
    let high = images();
    let out = low_res("{resolution: 8}")
        .corrupted(&high, &[1, 2, 3])
        .unwrap();
    assert_eq!(out.size(), [3, 3, 8, 8]);
    assert!(max_diff(&out, &downsample(&high, 8)) < 1e-6);
    // Each low pixel is the mean of its 4 × 4 block.
    let block =
        high.narrow(2, 4, 4)
            .narrow(3, 8, 4)
            .mean_dim([2i64, 3].as_slice(), false, Kind::Float);
    let pixel = out.narrow(2, 1, 1).narrow(3, 2, 1).view([3, 3]);
    assert!(max_diff(&block, &pixel) < 1e-6);
}

#[test]
fn blur_smooths_the_low_resolution_image_per_seed() {
    let high = images();
    let clean = downsample(&high, 16);
    let fixed = low_res("{resolution: 16, blur: {kernel: 3, sigma: 0.6}}");
    let a = fixed.corrupted(&high, &[1, 2, 3]).unwrap();
    assert_eq!(a.size(), [3, 3, 16, 16]);
    // 8-bit rounding apart, a blur keeps the mean and lowers the pixel-to-pixel differences.
    let mean_diff = (a.mean(Kind::Float) - clean.mean(Kind::Float))
        .abs()
        .double_value(&[]);
    assert!(mean_diff < 0.02, "{mean_diff}");
    let roughness = |t: &Tensor| {
        (t.narrow(3, 1, 15) - t.narrow(3, 0, 15))
            .abs()
            .mean(Kind::Float)
            .double_value(&[])
    };
    assert!(roughness(&a) < 0.8 * roughness(&clean));
    // A fixed σ ignores the seed; a drawn one follows it.
    assert!(a.equal(&fixed.corrupted(&high, &[7, 8, 9]).unwrap()));
    let drawn = low_res("{resolution: 16, blur: {kernel: 5, sigma: 0.6, sigma_range: [0.4, 2.0]}}");
    let b = drawn.corrupted(&high, &[1, 2, 3]).unwrap();
    assert!(b.equal(&drawn.corrupted(&high, &[1, 2, 3]).unwrap()));
    assert!(!b.equal(&drawn.corrupted(&high, &[4, 5, 6]).unwrap()));
}

#[test]
fn bsr_degrades_to_the_low_resolution_per_seed() {
    // Flat 16-px blocks of random colour: pictures the degradations blur and speckle, not erase.
    let high = images()
        .narrow(2, 0, 4)
        .narrow(3, 0, 4)
        .upsample_nearest2d([64, 64], None, None);
    let cfg: LowResConfig = serde_yaml::from_str("{resolution: 16, bsr: {scale: 4}}").unwrap();
    cfg.validate(64).unwrap();
    let a = cfg.corrupted(&high, &[1, 2, 3]).unwrap();
    assert_eq!(a.size(), [3, 3, 16, 16]);
    assert!(a.min().double_value(&[]) >= -1.0 && a.max().double_value(&[]) <= 1.0);
    assert!(a.equal(&cfg.corrupted(&high, &[1, 2, 3]).unwrap()));
    assert!(!a.equal(&cfg.corrupted(&high, &[4, 5, 6]).unwrap()));
    // Noise, blur and JPEG, but still the same picture: closer to its own clean version than to
    // another image's.
    let clean = downsample(&high, 16);
    let own = (&a - &clean).abs().mean(Kind::Float).double_value(&[]);
    let other = (&a - clean.roll([1], [0]))
        .abs()
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(own < 0.6 * other, "own {own}, other {other}");
}
