//! The prior's stage of the pipeline end to end through the binaries: shapes shards → `embed
//! --token-features` (a random tiny CLIP) → `train-prior` → `train-prior --sample`; and
//! `--dry-run` on the paper config.
use std::path::Path;
use std::process::Command;
use unclip_data::npy::NpyArray;
use unclip_data::shards::{write_shapes_shards, ShapesSpec};

const CLIP: &str = "
seed: 0
device: cpu
model:
  embed_dim: 32
  vision: {image_size: 32, patch_size: 16, width: 32, layers: 1, heads: 2}
  text: {context_length: 16, width: 32, layers: 1, heads: 2}
data:
  train: {shards: unused-000000.tar}
  held_out: {shards: unused-000000.tar}
  image: {resolution: 32}
";

fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{bin} {args:?}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn prior_config(dir: &Path) -> String {
    format!(
        "
seed: 0
device: cpu
prior:
  model: {{num_attention_heads: 2, attention_head_dim: 16, num_layers: 1, embedding_dim: 32, num_embeddings: 16}}
  sampling: {{sampler: ddim, steps: '8'}}
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

#[test]
fn embed_then_train_prior_then_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    unclip_clip::load::write_random_run(&dir.join("clip"), CLIP, 1).unwrap();
    for (prefix, count, seed) in [("img", 32, 1), ("val", 8, 2)] {
        write_shapes_shards(&ShapesSpec {
            count,
            resolution: 32,
            seed,
            shard_size: 16,
            out: dir.join("shapes"),
            prefix: prefix.into(),
        })
        .unwrap();
    }
    let embed = env!("CARGO_BIN_EXE_embed");
    for shards in ["img-{000000..000001}.tar", "val-000000.tar"] {
        run(
            embed,
            &[
                "--clip",
                dir.join("clip").to_str().unwrap(),
                "--shards",
                dir.join("shapes").join(shards).to_str().unwrap(),
                "--out",
                dir.join("emb").to_str().unwrap(),
                "--token-features",
                "--device",
                "cpu",
            ],
        );
    }
    let config = dir.join("prior.yaml");
    std::fs::write(&config, prior_config(dir)).unwrap();
    let run_dir = dir.join("run");
    let prior = env!("CARGO_BIN_EXE_train-prior");
    let out = run(
        prior,
        &[
            "--config",
            config.to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
        ],
    );
    assert!(out.contains("cosine(z_t, true z_i) baseline"), "{out}");
    assert!(
        out.contains("guidance  2.0") || out.contains("guidance    2"),
        "{out}"
    );
    assert!(run_dir
        .join("checkpoints/step-000000006/meta.json")
        .is_file());
    let npy = dir.join("z.npy");
    let out = run(
        prior,
        &[
            "--config",
            config.to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--sample",
            "a red circle",
            "--sample",
            "two blue squares",
            "--candidates",
            "3",
            "--out",
            npy.to_str().unwrap(),
        ],
    );
    assert!(out.contains("\"a red circle\": z_i · z_t"), "{out}");
    let z = NpyArray::from_bytes(&std::fs::read(&npy).unwrap()).unwrap();
    assert_eq!(z.shape, vec![2, 32]);
    for row in z.to_f32().chunks(32) {
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "embedding norm {norm}");
    }
}

#[test]
fn dry_run_prints_the_paper_priors_size() {
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/paper/prior.yaml"
    );
    let out = run(
        env!("CARGO_BIN_EXE_train-prior"),
        &["--config", config, "--dry-run", "--set", "device=cpu"],
    );
    let total: i64 = out
        .lines()
        .find(|l| l.trim_start().starts_with("total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no total in {out}"));
    // 24 blocks of 12·2048² (attention + 4× MLP) plus projections and positions: about 1.2 B.
    assert!((1_200_000_000..1_230_000_000).contains(&total), "{total}");
}
