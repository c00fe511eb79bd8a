//! The prior's stage of the pipeline end to end through the binaries: shapes shards → `embed
//! --token-features` (a random tiny CLIP) → `train-prior` → `train-prior --sample`; and
//! `--dry-run` on the paper config.
mod common;
use common::{dry_run_committed, dry_run_total, embedded_shapes, prior_config, run};
use unclip_data::npy::NpyArray;

#[test]
fn embed_then_train_prior_then_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    embedded_shapes(dir, 32, env!("CARGO_BIN_EXE_embed"));
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
    let out = dry_run_committed(
        env!("CARGO_BIN_EXE_train-prior"),
        "configs/paper/prior.yaml",
    );
    let total = dry_run_total(&out);
    // 24 blocks of 12·2048² (attention + 4× MLP) plus projections and positions: about 1.2 B.
    assert!((1_200_000_000..1_230_000_000).contains(&total), "{total}");
}
