//! End-to-end check of the diffusion core: trains a small denoiser on a ring of 8 Gaussians with
//! the hybrid loss (ε + learned variance, cosine schedule), samples it with every sampler, scores
//! the samples against the known mixture and writes a scatter plot.
//!
//!     cargo run -p unclip-diffusion --example toy2d -- [--steps 3000] [--out runs/toy2d-samplers]

use anyhow::{bail, Context, Result};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};
use unclip_diffusion::toy::{scatter_image, train_toy, RingOfGaussians, ToyDenoiser};
use unclip_diffusion::{
    BetaSchedule, ClipDenoised, DiffusionConfig, GaussianDiffusion, LossType, MeanType, Respacing,
    SamplerKind, VarianceType,
};

fn main() -> Result<()> {
    let mut steps = 3000usize;
    let mut out_dir = std::path::PathBuf::from("runs/toy2d-samplers");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--steps" => {
                steps = args
                    .next()
                    .context("--steps needs a value")?
                    .parse()
                    .context("--steps")?
            }
            "--out" => out_dir = args.next().context("--out needs a value")?.into(),
            other => bail!("unknown argument `{other}` (expected --steps N, --out DIR)"),
        }
    }
    tch::manual_seed(0);
    let device = unclip_diffusion::device::parse_device("auto")?;
    let config = DiffusionConfig {
        schedule: BetaSchedule::Cosine,
        timesteps: 1000,
        predict: MeanType::Epsilon,
        variance: VarianceType::LearnedRange,
        loss: LossType::Hybrid,
        ..Default::default()
    };
    let diffusion = GaussianDiffusion::new(&config)?.to_device(device);
    let data = RingOfGaussians::default();
    let vs = nn::VarStore::new(device);
    let model = ToyDenoiser::new(vs.root(), 256, 4, 4);

    println!(
        "training {steps} steps on {device:?} (ring of {} Gaussians, hybrid loss)",
        data.modes
    );
    let start = Instant::now();
    let losses = train_toy(&vs, &model, &diffusion, &data, steps, 512, 1e-3)?;
    let chunk = (steps / 10).max(1);
    for (i, c) in losses.chunks(chunk).enumerate() {
        println!(
            "  steps {:>5}..{:<5} loss {:.4}",
            i * chunk,
            i * chunk + c.len(),
            c.iter().sum::<f64>() / c.len() as f64
        );
    }
    println!("trained in {:.1}s", start.elapsed().as_secs_f64());

    let own = data.score(&data.sample(4096, Device::Cpu));
    println!(
        "\n{:<24} {:>8} {:>10} {:>10} {:>20}",
        "sampler", "seconds", "distance", "near mode", "mode share min/max"
    );
    let row = |name: &str, secs: String, s: &unclip_diffusion::toy::ToyScore| {
        let (lo, hi) = s
            .mode_share
            .iter()
            .fold((1.0f64, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        println!(
            "{name:<24} {secs:>8} {:>10.4} {:>10.3} {:>20}",
            s.mean_distance,
            s.near_fraction,
            format!("{lo:.3} / {hi:.3}")
        );
    };
    row("data itself", "-".into(), &own);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut panels = Vec::new();
    for (name, kind, spacing) in [
        ("ddpm 1000 steps", SamplerKind::Ddpm, "1000"),
        ("ddpm 100 steps", SamplerKind::Ddpm, "100"),
        (
            "ddim eta=0 50 steps",
            SamplerKind::Ddim { eta: 0.0 },
            "ddim50",
        ),
        ("ddim eta=0 20 steps", SamplerKind::Ddim { eta: 0.0 }, "20"),
        ("dpm-solver++ 20 steps", SamplerKind::DpmSolverPp2M, "20"),
    ] {
        let sampler =
            GaussianDiffusion::respaced(&config, &Respacing::from(spacing))?.to_device(device);
        let start = Instant::now();
        let noise = Tensor::randn([4096, 2], (Kind::Float, device));
        // ε-prediction divides by α ≈ 1e-4 at the last cosine step: bound x_0 as image models do.
        let x = sampler.sample(
            kind,
            &ClipDenoised::Static(1.5),
            noise,
            |x: &Tensor, t: &Tensor| model.forward(x, t),
            None,
        )?;
        row(
            name,
            format!("{:.2}", start.elapsed().as_secs_f64()),
            &data.score(&x),
        );
        panels.push(x.to_device(Device::Cpu));
    }
    let path = out_dir.join("samples.png");
    write_scatter(&path, &panels)?;
    println!(
        "\nscatter plots (one panel per sampler): {}",
        path.display()
    );
    Ok(())
}

/// Side-by-side 256×256 scatter panels of points in [-1.5, 1.5]².
fn write_scatter(path: &std::path::Path, panels: &[Tensor]) -> Result<()> {
    let images = panels
        .iter()
        .map(|p| scatter_image(p, 256))
        .collect::<Result<Vec<_>, _>>()?;
    let row = Tensor::cat(&images, 2).permute([1, 2, 0]).contiguous(); // [H, W·n, 3]
    let (h, w) = (row.size()[0] as u32, row.size()[1] as u32);
    let bytes: Vec<u8> = Vec::try_from(row.flatten(0, -1))?;
    let img = image::RgbImage::from_raw(w, h, bytes).context("scatter buffer size")?;
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))
}
