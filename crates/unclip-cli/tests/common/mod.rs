//! Helpers the binaries' end-to-end tests share.
#![allow(dead_code)] // each test binary uses some of the helpers
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use tch::Tensor;
use unclip_clip::load::TINY_CLIP_CONFIG;
use unclip_data::shards::{write_shapes_shards, ShapesSpec};

/// Runs `bin` with `args`; panics with its output unless it succeeds. Returns stdout.
pub fn run(bin: &str, args: &[&str]) -> String {
    run_with_stderr(bin, args).0
}

/// [`run`], returning stdout and stderr.
pub fn run_with_stderr(bin: &str, args: &[&str]) -> (String, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{bin} {args:?}\n{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout),
    );
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// Runs `bin` with `args`; panics if it succeeds. Returns stdout and stderr together.
pub fn run_fails(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{bin} {args:?} succeeded:\n{text}");
    text
}

/// `bin --config CONFIG --dry-run --set device=cpu` on a committed config (`CONFIG` relative to
/// the repository root, e.g. `configs/paper/prior.yaml`); panics unless it succeeds. Its stdout.
pub fn dry_run_committed(bin: &str, config: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(config);
    run(
        bin,
        &[
            "--config",
            path.to_str().unwrap(),
            "--dry-run",
            "--set",
            "device=cpu",
        ],
    )
}

/// The `total` parameter count a `--dry-run` printed.
pub fn dry_run_total(out: &str) -> i64 {
    out.lines()
        .find(|l| l.trim_start().starts_with("total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no total in {out}"))
}

/// A random tiny CLIP in `dir/clip`, `train` shapes images at 32 px in two shards
/// (`dir/shapes/img-00000{0,1}.tar`) and 8 held-out ones (`val-000000.tar`), and their embeddings
/// with token features in `dir/emb` (through the `embed` binary, `embed_bin`).
pub fn embedded_shapes(dir: &Path, train: u64, embed_bin: &str) {
    unclip_clip::load::write_random_run(&dir.join("clip"), TINY_CLIP_CONFIG, 1).unwrap();
    for (prefix, count, seed) in [("img", train, 1), ("val", 8, 2)] {
        write_shapes_shards(&ShapesSpec {
            count,
            resolution: 32,
            seed,
            shard_size: train.div_ceil(2),
            out: dir.join("shapes"),
            prefix: prefix.into(),
        })
        .unwrap();
    }
    embed_shapes(dir, "emb", embed_bin, &[]);
}

/// `embed` (the binary `embed_bin`, with `extra` flags such as `--raw`) of [`embedded_shapes`]'
/// training and held-out shards with `dir/clip` into `dir/OUT`, token features included.
pub fn embed_shapes(dir: &Path, out: &str, embed_bin: &str, extra: &[&str]) {
    for shards in ["img-{000000..000001}.tar", "val-000000.tar"] {
        let (clip, shards, out) = (
            dir.join("clip"),
            dir.join("shapes").join(shards),
            dir.join(out),
        );
        let mut args = vec![
            "--clip",
            clip.to_str().unwrap(),
            "--shards",
            shards.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--token-features",
            "--device",
            "cpu",
        ];
        args.extend(extra);
        run(embed_bin, &args);
    }
}

/// A tiny prior config on `embedded_shapes(dir, …)`: 6 steps, checkpoints every 3.
pub fn prior_config(dir: &Path) -> String {
    prior_config_with(dir, DIFFUSION_PRIOR)
}

/// The tiny diffusion prior's `prior:` section.
pub const DIFFUSION_PRIOR: &str = "
  model: {num_attention_heads: 2, attention_head_dim: 16, num_layers: 1, embedding_dim: 32, num_embeddings: 16}
  sampling: {sampler: ddim, steps: '8'}";

/// A tiny autoregressive prior's `prior:` section: 8 of 32 components, 32 buckets. (`text_width`
/// left out would be the paper's 2048: a 50M-parameter caption encoder.)
pub const AUTOREGRESSIVE_PRIOR: &str = "
  kind: autoregressive
  autoregressive: {num_attention_heads: 2, attention_head_dim: 16, num_layers: 1, text_layers: 1,
    text_width: 32, embedding_dim: 32, num_embeddings: 16, components: 8, buckets: 32, dot_buckets: 4}";

/// [`prior_config`] with `section` as the `prior:` section's body.
pub fn prior_config_with(dir: &Path, section: &str) -> String {
    format!(
        "
seed: 0
device: cpu
prior:{section}
clip: {dir}/clip
data:
  train: {dir}/emb/img-{{000000..000001}}.tar
  held_out: {dir}/emb/val-000000.tar
eval: {{every: 3, count: 8, guidance_scales: [1.0, 2.0]}}
train: {{steps: 6, batch_size: 8}}
logging: {{every: 3, progress: off}}
checkpoint: {{every: 3}}
",
        dir = dir.display()
    )
}

/// A tiny decoder config on `embedded_shapes(dir, …)` at 32 px: 40 steps, grids and checkpoints
/// every 20.
pub fn decoder_config(dir: &Path) -> String {
    format!(
        "
seed: 0
device: cpu
decoder:
  model:
    clip_embeddings_dim: 32
    unet:
      block_out_channels: [16, 32]
      down_block_types: [ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D]
      up_block_types: [SimpleCrossAttnUpBlock2D, ResnetUpsampleBlock2D]
      layers_per_block: 1
      cross_attention_dim: 32
      attention_head_dim: 8
      norm_num_groups: 8
  sampling: {{sampler: ddim, steps: '4'}}
clip: {dir}/clip
data:
  train: {dir}/shapes/img-{{000000..000001}}.tar
  held_out: {dir}/shapes/val-000000.tar
  embedding_dir: {dir}/emb
  image: {{resolution: 32}}
samples: {{count: 4, guidance_scales: [1.0, 3.0], denoise_strengths: [0.25, 0.5]}}
train: {{steps: 40, batch_size: 8, lr: 2.0e-3, ema_decay: 0.9}}
logging: {{every: 10, images_every: 20, progress: lines}}
checkpoint: {{every: 20}}
",
        dir = dir.display()
    )
}

/// `bin --config CONFIG --run-dir RUN_DIR` over 2 local ranks for `steps` steps, 4 samples per
/// rank (`--resume auto` when `resume`); panics unless both succeed within 300 s. Every rank's
/// output.
pub fn launch_two_ranks(
    bin: &str,
    config: &Path,
    run_dir: &Path,
    steps: &str,
    resume: bool,
) -> Vec<String> {
    launch_two_ranks_with(bin, config, run_dir, steps, resume, &[])
}

/// [`launch_two_ranks`] with more `--set` overrides.
pub fn launch_two_ranks_with(
    bin: &str,
    config: &Path,
    run_dir: &Path,
    steps: &str,
    resume: bool,
    sets: &[&str],
) -> Vec<String> {
    let steps = format!("train.steps={steps}");
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &steps,
        "--set",
        "train.batch_size=4",
        "--set",
        "distributed.timeout_secs=60",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    if resume {
        args.extend(["--resume", "auto"]);
    }
    // No OMP_NUM_THREADS: the runtime shares the cores out between the ranks.
    let ranks = unclip_dist::launch::launch_local(
        Path::new(bin),
        &args,
        2,
        &[],
        std::time::Duration::from_secs(300),
    )
    .expect("the ranks did not finish within 300 s");
    let outputs: Vec<String> = ranks.iter().map(|r| r.output.clone()).collect();
    assert!(
        ranks.iter().all(|r| r.success),
        "{}",
        outputs.join("\n---- next rank ----\n")
    );
    outputs
}

/// The tensors of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Panics unless `got` holds exactly `want`'s tensors, bit for bit; `what` names `got`.
pub fn assert_same_tensors(
    got: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
    what: &str,
) {
    assert_eq!(got.len(), want.len(), "{what}: tensor count");
    for (name, t) in got {
        let w = want
            .get(name)
            .unwrap_or_else(|| panic!("{what}: {name} is not expected"));
        assert!(t.equal(w), "{what}: {name} differs");
    }
}

/// Makes `pipeline` a diffusers pipeline directory (`model_index.json`) holding the model
/// directory `component` as `subfolder/`.
pub fn pipeline_holding(component: &Path, pipeline: &Path, subfolder: &str) {
    std::fs::create_dir_all(pipeline.join(subfolder)).unwrap();
    std::fs::write(pipeline.join("model_index.json"), "{}").unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(component.join(file), pipeline.join(subfolder).join(file)).unwrap();
    }
}

/// Trains `bin --config config --run-dir run_dir --set …` for one step at an lr of 1e-30, which
/// leaves the weights as they started (what an `init_from` check needs); the step-1 checkpoint's
/// model weights, and what the run printed on stderr.
pub fn one_step_weights(
    bin: &str,
    config: &Path,
    run_dir: &Path,
    sets: &[&str],
) -> (HashMap<String, Tensor>, String) {
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
    ];
    for set in ["train.steps=1", "train.lr=1e-30", "checkpoint.every=1"]
        .iter()
        .chain(sets)
    {
        args.extend(["--set", set]);
    }
    let (_, stderr) = run_with_stderr(bin, &args);
    let weights = read_tensors(&run_dir.join("checkpoints/step-000000001/model.safetensors"));
    (weights, stderr)
}
