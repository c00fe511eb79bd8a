//! The upsampler's stage through the binary: shapes shards → `train-upsampler`: the loss falls,
//! EMA grids and PSNRs are written, a resumed run ends with the same weights as an uninterrupted
//! one (in one process and over 2 data-parallel ranks), `--grid` and `--export-diffusers` read its
//! checkpoints; `--dry-run` on the committed configs (the paper's counted without building them).
use std::path::Path;

use unclip_data::shards::{write_shapes_shards, ShapesSpec};
mod common;
use common::{
    assert_same_tensors, dry_run_committed, dry_run_total, launch_two_ranks, one_step_weights,
    pipeline_holding, run, run_fails,
};

const BIN: &str = env!("CARGO_BIN_EXE_train-upsampler");

/// 48 training and 8 held-out shapes images at 32 px, and a 16 → 32 upsampler config.
fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (prefix, count, seed) in [("img", 48, 1), ("val", 8, 2)] {
        write_shapes_shards(&ShapesSpec {
            count,
            resolution: 32,
            seed,
            shard_size: 24,
            out: dir.join("shapes"),
            prefix: prefix.into(),
        })
        .unwrap();
    }
    let config = dir.join("upsampler.yaml");
    std::fs::write(
        &config,
        format!(
            "
seed: 0
device: cpu
upsampler:
  model: {{block_out_channels: [16, 32], layers_per_block: 1, norm_num_groups: 4}}
  sampling: {{sampler: ddim, steps: ddim4, clip: {{static: 1.0}}}}
  low_res: {{resolution: 16, blur: {{kernel: 3, sigma: 0.6, sigma_range: [0.4, 0.8]}}}}
  crop: 16
data:
  train: {dir}/shapes/img-{{000000..000001}}.tar
  held_out: {dir}/shapes/val-000000.tar
  image: {{resolution: 32, random_flip: true}}
  shuffle_buffer: 16
samples: {{count: 4}}
train: {{steps: 40, batch_size: 8, lr: 2.0e-3, ema_decay: 0.9}}
logging: {{every: 10, images_every: 20, progress: lines}}
checkpoint: {{every: 20}}
",
            dir = dir.display()
        ),
    )
    .unwrap();
    (tmp, config)
}

fn train(config: &Path, run_dir: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
    ];
    args.extend(extra);
    run(BIN, &args)
}

fn psnrs(line: &str) -> (f64, f64) {
    let line = line.split("; sharpness").next().unwrap();
    let number = |after: &str| -> f64 {
        line.split(after)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (number("samples "), number("bicubic upsampling "))
}

#[test]
fn train_upsampler_learns_writes_grids_resumes_exactly_and_exports() {
    let (tmp, config) = setup();
    let dir = tmp.path();
    let full = dir.join("full");
    let out = train(&config, &full, &[]);
    let losses: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("step "))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
        .collect();
    assert_eq!(losses.len(), 4, "{out}");
    assert!(
        losses[3] < 0.8 * losses[0],
        "the hybrid loss falls: {losses:?}"
    );
    let ema = out
        .lines()
        .find(|l| l.starts_with("held-out upsamplings, EMA weights: PSNR"))
        .unwrap_or_else(|| panic!("{out}"));
    let (sample, bicubic) = psnrs(ema);
    // Bicubic upsampling of flat-coloured shapes is close (tens of dB); 40 steps' samples are
    // still noisy, but PSNRs both.
    assert!(bicubic > 20.0 && bicubic < 60.0, "{ema}");
    assert!(sample > 0.0 && sample < bicubic, "{ema}");
    // Bicubic upsampling blurs the shapes' edges: less contrast than the real images.
    let bicubic_sharpness: f64 = ema
        .split("bicubic ")
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(bicubic_sharpness > 0.3 && bicubic_sharpness < 0.95, "{ema}");
    // Rows: bicubic, samples, real; 4 columns of 32 px.
    for name in ["step_000020.png", "step_000040.png", "final_ema.png"] {
        let img = image::open(full.join("samples").join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (4 * 32, 3 * 32), "{name}");
    }
    let scalars = unclip_testkit::read_scalars(&full.join("tensorboard"));
    for step in [20, 40] {
        for key in [
            "samples/psnr",
            "samples/psnr_bicubic",
            "samples/sharpness",
            "samples/sharpness_bicubic",
        ] {
            let v = scalars.get(&(key.to_string(), step));
            assert!(v.is_some_and(|v| *v > 0.0), "{key} {step}: {v:?}");
        }
    }
    // 20 steps, then resumed to 40: the same weights and EMA (the corruption and crops are drawn
    // from the step, so the resumed half sees the same batches).
    let split = dir.join("split");
    train(&config, &split, &["--set", "train.steps=20"]);
    train(&config, &split, &["--resume", "auto"]);
    for file in ["model.safetensors", "ema.safetensors"] {
        let read =
            |run: &Path| std::fs::read(run.join("checkpoints/step-000000040").join(file)).unwrap();
        assert!(read(&full) == read(&split), "{file} differs after resume");
    }
    // --grid: the newest checkpoint (the same samples as the run's last EMA grid), or a chosen one.
    let png = dir.join("grid.png");
    let out = train(&config, &full, &["--grid", png.to_str().unwrap()]);
    let line = out
        .lines()
        .find(|l| l.contains("(EMA weights): PSNR"))
        .unwrap();
    assert!(line.contains("step-000000040"), "{out}");
    assert_eq!(psnrs(line), (sample, bicubic), "{out}\n{ema}");
    let c20 = full.join("checkpoints/step-000000020");
    let out = train(
        &config,
        &full,
        &[
            "--grid",
            png.to_str().unwrap(),
            "--checkpoint",
            c20.to_str().unwrap(),
        ],
    );
    assert!(out.contains("step-000000020 (EMA weights): PSNR"), "{out}");
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (4 * 32, 3 * 32));
    // --export-diffusers writes the EMA weights as a UNet2DModel directory that loads back.
    let export = dir.join("export");
    train(
        &config,
        &full,
        &["--export-diffusers", export.to_str().unwrap()],
    );
    let loaded =
        unclip_upsampler::diffusers::load_diffusers_upsampler(&export, tch::Device::Cpu).unwrap();
    let ema: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(full.join("checkpoints/step-000000040/ema.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let vars = loaded.vs.variables();
    assert_eq!(vars.len(), ema.len());
    for (name, v) in vars {
        assert!(
            v.equal(&ema[&name]),
            "{name} differs from the EMA checkpoint"
        );
    }
    // upsampler.init_from: a run starts from the export's weights, given the UNet2DModel
    // directory or a pipeline directory holding it as super_res_first/.
    let pipeline = dir.join("pipeline");
    pipeline_holding(&export, &pipeline, "super_res_first");
    for (name, from) in [("init-unet", &export), ("init-pipeline", &pipeline)] {
        let init = format!("upsampler.init_from={}", from.display());
        let (model, _) = one_step_weights(BIN, &config, &dir.join(name), &[&init]);
        assert_same_tensors(&model, &ema, name);
    }
    // Bad configs fail before any work, naming the key: a model other than the export's (the
    // error prints the one that fits), a crop that does not fit.
    let refused = |set: &[&str]| -> String {
        let bad_dir = dir.join("bad");
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "--run-dir",
            bad_dir.to_str().unwrap(),
        ];
        for s in set {
            args.extend(["--set", s]);
        }
        let out = run_fails(BIN, &args);
        assert!(!bad_dir.exists(), "{out}");
        out
    };
    let init = format!("upsampler.init_from={}", export.display());
    let bad = refused(&[&init, "upsampler.model.layers_per_block=2"]);
    assert!(
        bad.contains("upsampler.init_from") && bad.contains("\"layers_per_block\":1"),
        "{bad}"
    );
    let bad = refused(&["upsampler.crop=17"]);
    assert!(bad.contains("upsampler.crop (17)"), "{bad}");
}

#[test]
fn dry_run_counts_the_committed_upsamplers() {
    let shapes = dry_run_total(&dry_run_committed(BIN, "configs/shapes/upsampler.yaml"));
    assert!(shapes > 100_000 && shapes < 10_000_000, "{shapes}");
    // The paper's 64→256 upsampler (Table 3: ~700 M parameters), counted without building it.
    let out = dry_run_committed(BIN, "configs/paper/upsampler-256.yaml");
    assert!(out.contains("counted from the config"), "{out}");
    let n = dry_run_total(&out) as f64;
    assert!(n > 650e6 && n < 750e6, "{n}");
}

#[test]
fn train_upsampler_runs_data_parallel_and_resumes_exactly() {
    let (tmp, config) = setup();
    let dir = tmp.path();
    // With activation checkpointing: each rank's backward recomputes its blocks before the
    // gradients are averaged.
    let yaml = std::fs::read_to_string(&config).unwrap();
    let yaml = yaml.replace(
        "  crop: 16\n",
        "  crop: 16\n  gradient_checkpointing: true\n",
    );
    assert!(yaml.contains("gradient_checkpointing: true"));
    std::fs::write(&config, yaml).unwrap();
    let full = dir.join("full");
    let outputs = launch_two_ranks(BIN, &config, &full, "20", false);
    // Each rank reads its own shard (24 images an epoch); only rank 0 samples and checkpoints.
    for (rank, out) in outputs.iter().enumerate() {
        assert!(
            out.contains(&format!("epoch 0 done on rank {rank}: 24 samples")),
            "{out}"
        );
    }
    for what in ["samples step", "checkpoint "] {
        assert!(
            outputs[0].contains(what) && !outputs[1].contains(what),
            "{what}"
        );
    }
    // Stopped at 10 and resumed by both ranks: the same weights and EMA (each rank's data
    // position, and the corruption and crops drawn from the step and rank, come back).
    let split = dir.join("split");
    launch_two_ranks(BIN, &config, &split, "10", false);
    launch_two_ranks(BIN, &config, &split, "20", true);
    for file in ["model.safetensors", "ema.safetensors"] {
        let read =
            |run: &Path| std::fs::read(run.join("checkpoints/step-000000020").join(file)).unwrap();
        assert!(read(&full) == read(&split), "{file} differs after resume");
    }
}
