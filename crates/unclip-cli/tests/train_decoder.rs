//! The decoder's stage through the binaries: shapes shards → `embed --token-features` (a random
//! tiny CLIP) → `train-decoder`: the loss falls, EMA grids are written, a resumed run ends with
//! the same weights as an uninterrupted one (in one process and over 2 data-parallel ranks), stored
//! and on-the-fly CLIP conditioning agree (z_t in z_i's place with `decoder.embedding: text`); and
//! `--dry-run` on the paper config.
use std::path::Path;
mod common;
use common::{
    decoder_config, dry_run_committed, dry_run_total, embed_shapes, embedded_shapes,
    launch_two_ranks, launch_two_ranks_with, run, run_fails,
};
use unclip_data::embeddings::ClipEmbeddings;
use unclip_decoder::task::{
    ConditioningEmbedding, DecoderTask, DecoderTrainConfig, EmbeddingSource,
};
use unclip_decoder::LoadedDecoder;
use unclip_train::config::parse_config;

/// A random CLIP, 48 training and 8 held-out shapes images at 32 px, and their embeddings.
fn dataset(dir: &Path) {
    embedded_shapes(dir, 48, env!("CARGO_BIN_EXE_embed"));
}

fn losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("step "))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
        .collect()
}

/// `train-decoder --config CONFIG --run-dir RUN_DIR`, `--set` each of `sets`, then `extra`.
fn run_with(decoder: &str, config: &Path, run_dir: &Path, sets: &[&str], extra: &[&str]) -> String {
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    args.extend(extra);
    run(decoder, &args)
}

/// Trains the config's 40 steps into `run_dir` (with `--set` `sets`), then `check_run`.
fn train_and_check_grids(decoder: &str, config: &Path, run_dir: &Path, sets: &[&str]) {
    check_run(&run_with(decoder, config, run_dir, sets, &[]), run_dir);
}

/// A 40-step run's output (rank 0's) and directory: the loss falls, and the EMA grids (real
/// images, one row per guidance scale, then one per denoising strength and scale) are written.
fn check_run(out: &str, run_dir: &Path) {
    let l = losses(out);
    assert_eq!(l.len(), 4, "{out}");
    assert!(l[3] < 0.8 * l[0], "the hybrid loss falls: {l:?}");
    assert!(
        out.contains("held-out samples, EMA weights: cos(CLIP(sample), z_i)"),
        "{out}"
    );
    // Shapes scenes: each grid's shapes are counted, the real images' too (the scorer's check).
    let counts: Vec<&str> = out.lines().filter(|l| l.starts_with("shapes: ")).collect();
    // The final current and EMA samples (and each grid's, where stderr is captured too).
    assert!(counts.len() >= 2, "{out}");
    for line in counts {
        assert!(
            line.contains("guidance 1 shape right") && line.contains("guidance 3 shape right"),
            "{line}"
        );
        let real = line.split("(real images shape right ").nth(1).unwrap();
        let (right, objects) = real.split_once(' ').unwrap().0.split_once('/').unwrap();
        let (right, objects): (usize, usize) = (right.parse().unwrap(), objects.parse().unwrap());
        assert!(objects >= 4 && 10 * right >= 7 * objects, "{line}");
    }
    // SDEdit rows: of the 4 sampling steps, strength 0.25 runs the last (t = 0), where x_t is
    // the image itself up to 0.6 % noise and any x_0 estimate keeps its shapes; 0.5 the last two.
    let denoised: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("shapes denoised from t="))
        .collect();
    assert!(denoised.len() >= 4, "{out}");
    for line in denoised {
        let t: i64 = line["shapes denoised from t=".len()..]
            .split_once(' ')
            .unwrap()
            .0
            .parse()
            .unwrap();
        assert!(line.contains("own conditioning shape right"), "{line}");
        assert!(line.contains("another scene's shape right"), "{line}");
        if line.contains("(strength 0.25)") {
            assert_eq!(t, 0, "{line}");
            let own = line.split("own conditioning shape right ").nth(1).unwrap();
            let (right, objects) = own.split_once(' ').unwrap().0.split_once('/').unwrap();
            let (right, objects): (usize, usize) =
                (right.parse().unwrap(), objects.parse().unwrap());
            assert!(objects >= 4 && 10 * right >= 7 * objects, "{line}");
        } else {
            assert!(line.contains("(strength 0.5)") && t > 0, "{line}");
        }
    }
    // The grids' scores reach TensorBoard at their steps.
    let scalars = unclip_testkit::read_scalars(&run_dir.join("tensorboard"));
    for g in ["1", "3"] {
        let kinds = [
            "clip_score".to_string(),
            "shapes_right".into(),
            "objects_missing".into(),
            "shapes_right_denoised_0.5".into(),
            "shapes_right_denoised_0.25".into(),
        ];
        for kind in kinds {
            for step in [20, 40] {
                let v = scalars.get(&(format!("samples/{kind}_guidance_{g}"), step));
                assert!(
                    v.is_some_and(|v| (-1.0..=1.0).contains(v)),
                    "{kind} {g} {step}: {v:?}"
                );
            }
        }
    }
    // 4 columns of 32 px.
    for name in ["step_000020.png", "step_000040.png", "final_ema.png"] {
        let img = image::open(run_dir.join("samples").join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (4 * 32, 7 * 32), "{name}");
    }
}

/// 20 steps into `split`, then resumed to 40: the same weights and EMA as `full`'s 40.
fn resume_matches_the_full_run(
    decoder: &str,
    config: &Path,
    full: &Path,
    split: &Path,
    sets: &[&str],
) {
    let steps = |n: &str| format!("train.steps={n}");
    let (first, second) = (steps("20"), steps("40"));
    run_with(decoder, config, split, &[sets, &[&first]].concat(), &[]);
    run_with(
        decoder,
        config,
        split,
        &[sets, &[&second]].concat(),
        &["--resume", "auto"],
    );
    same_step_40(full, split, &["model.safetensors", "ema.safetensors"]);
}

/// Each of `files` is byte-identical in the step-40 checkpoints of `full` and `split`.
fn same_step_40(full: &Path, split: &Path, files: &[&str]) {
    for file in files {
        let read =
            |run: &Path| std::fs::read(run.join("checkpoints/step-000000040").join(file)).unwrap();
        assert!(read(full) == read(split), "{file} differs after resume");
    }
}

/// The training tests take turns: two ranks waiting on each other slow down badly when another
/// test's training shares their two cores (136 s against ~20 s alone).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A temporary directory with `dataset` and `decoder_config` (the config's path returned).
fn tiny_setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path());
    let config = tmp.path().join("decoder.yaml");
    std::fs::write(&config, decoder_config(tmp.path())).unwrap();
    (tmp, config)
}

/// A tiny run with `--set` `sets`, through `train_and_check_grids` and
/// `resume_matches_the_full_run`, then exported as a diffusers pipeline directory and loaded
/// back with the EMA weights. Returns the temporary directory (alive while held) and the export.
fn train_resume_and_export(sets: &[&str]) -> (tempfile::TempDir, LoadedDecoder) {
    let _serial = serial();
    let (tmp, config) = tiny_setup();
    let dir = tmp.path();
    let decoder = env!("CARGO_BIN_EXE_train-decoder");
    let full = dir.join("full");
    train_and_check_grids(decoder, &config, &full, sets);
    resume_matches_the_full_run(decoder, &config, &full, &dir.join("split"), sets);
    // --grid scores the newest checkpoint, or the one --checkpoint names.
    let png = dir.join("grid.png");
    for (pick, step) in [
        (None, "step-000000040"),
        (Some("step-000000020"), "step-000000020"),
    ] {
        let ckpt = pick.map(|p| full.join("checkpoints").join(p));
        let mut extra = vec!["--grid", png.to_str().unwrap()];
        if let Some(c) = &ckpt {
            extra.extend(["--checkpoint", c.to_str().unwrap()]);
        }
        let out = run_with(decoder, &config, &full, sets, &extra);
        assert!(
            out.contains(&format!("{step} (EMA weights): cos(CLIP(sample), z_i)")),
            "{out}"
        );
        assert!(
            out.contains("shapes denoised from t=0 (strength 0.25)"),
            "{out}"
        );
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (4 * 32, 7 * 32));
    }
    let missing = full.join("checkpoints/step-000000030");
    let out = run_fails(
        decoder,
        &[
            "--config",
            config.to_str().unwrap(),
            "--grid",
            png.to_str().unwrap(),
            "--checkpoint",
            missing.to_str().unwrap(),
        ],
    );
    assert!(out.contains("step-000000030/meta.json"), "{out}");
    // Into a pipeline directory: its decoder/ replaced whole, its other files left alone.
    let export = dir.join("export");
    std::fs::create_dir_all(export.join("decoder")).unwrap();
    std::fs::write(export.join("decoder/stale.safetensors"), "old").unwrap();
    std::fs::write(export.join("model_index.json"), "{}").unwrap();
    let to = ["--export-diffusers", export.to_str().unwrap()];
    run_with(decoder, &config, &full, sets, &to);
    assert!(!export.join("decoder/stale.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(export.join("model_index.json")).unwrap(),
        "{}"
    );
    // It loads back with the EMA weights.
    let loaded = unclip_decoder::load_diffusers_decoder(&export, tch::Device::Cpu).unwrap();
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
    (tmp, loaded)
}

#[test]
fn a_self_conditioned_decoder_learns_samples_resumes_exactly_and_exports() {
    // The first-pass coin comes from the seeded generator the checkpoint restores; diffusers has
    // no self-conditioning flag, so the export's 6 input channels say it. With activation
    // checkpointing, whose recomputation sets that generator back and forth (the resume must
    // still match the full run).
    let (_tmp, loaded) = train_resume_and_export(&[
        "decoder.model.self_condition=true",
        "decoder.model.unet.in_channels=6",
        "decoder.gradient_checkpointing=true",
    ]);
    assert!(loaded.config.self_condition && loaded.model.self_condition);
}

#[test]
fn embed_then_train_decoder_learns_writes_grids_and_resumes_exactly() {
    let (_tmp, loaded) = train_resume_and_export(&[]);
    assert!(!loaded.model.self_condition);
}

#[test]
fn stored_and_on_the_fly_conditioning_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    dataset(dir);
    let cfg = parse_config::<DecoderTrainConfig>(&decoder_config(dir), &[]).unwrap();
    let task = |source: EmbeddingSource| {
        let mut c = cfg.task.clone();
        c.data.embeddings = source;
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        DecoderTask::new(&vs, &c, 0, 8, 0, 1, None)
    };
    let stored = task(EmbeddingSource::Stored).unwrap();
    let clip = task(EmbeddingSource::Clip).unwrap();
    let (a, b) = (
        &stored.held_out().unwrap().cond,
        &clip.held_out().unwrap().cond,
    );
    let diff = |x: &tch::Tensor, y: &tch::Tensor| (x - y).abs().max().double_value(&[]);
    assert!(diff(&a.image_embeds, &b.image_embeds) < 1e-5);
    assert!(diff(&a.text.text_embeds, &b.text.text_embeds) < 1e-5);
    assert!(a.text.mask.equal(&b.text.mask));
    // Stored token features are float16.
    let masked = |t: &tch::Tensor, m: &tch::Tensor| t * m.unsqueeze(-1).to_kind(tch::Kind::Float);
    assert!(
        diff(
            &masked(&a.text.tokens, &a.text.mask),
            &masked(&b.text.tokens, &b.text.mask)
        ) < 1e-2
    );
    // decoder.embedding: text puts each caption's z_t where z_i was, from either source; the
    // grids' CLIP score still compares with the real images' z_i.
    for source in [EmbeddingSource::Stored, EmbeddingSource::Clip] {
        let mut c = cfg.task.clone();
        c.data.embeddings = source;
        c.decoder.embedding = ConditioningEmbedding::Text;
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let text = DecoderTask::new(&vs, &c, 0, 8, 0, 1, None).unwrap();
        let h = text.held_out().unwrap();
        assert!(h.cond.image_embeds.equal(&h.cond.text.text_embeds));
        assert!(diff(&h.cond.image_embeds, &a.text.text_embeds) < 1e-5);
        assert!(diff(&h.image_embeds, &a.image_embeds) < 1e-5);
        assert!(
            diff(&h.cond.image_embeds, &h.image_embeds) > 0.1,
            "{source:?}"
        );
    }
    // decoder.clip_embeddings: raw — stored (`embed --raw`) and on-the-fly agree, and are the
    // normalised ones before normalising.
    embed_shapes(dir, "emb-raw", env!("CARGO_BIN_EXE_embed"), &["--raw"]);
    let raw_task = |source: EmbeddingSource| {
        let mut c = cfg.task.clone();
        c.data.embeddings = source;
        c.data.embedding_dir = Some(dir.join("emb-raw"));
        c.decoder.clip_embeddings = ClipEmbeddings::Raw;
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        DecoderTask::new(&vs, &c, 0, 8, 0, 1, None).unwrap()
    };
    let (raw_stored, raw_clip) = (
        raw_task(EmbeddingSource::Stored),
        raw_task(EmbeddingSource::Clip),
    );
    let (r, q) = (
        &raw_stored.held_out().unwrap().cond,
        &raw_clip.held_out().unwrap().cond,
    );
    let unit = |x: &tch::Tensor| x / x.norm_scalaropt_dim(2, [-1], true);
    for (raw, normalised, clip) in [
        (&r.image_embeds, &a.image_embeds, &q.image_embeds),
        (
            &r.text.text_embeds,
            &a.text.text_embeds,
            &q.text.text_embeds,
        ),
    ] {
        assert!(diff(raw, clip) < 1e-4);
        assert!(diff(&unit(raw), normalised) < 1e-5);
        assert!(diff(raw, normalised) > 0.1);
    }
    // Without the embedding shards the error names the key and the missing file.
    std::fs::remove_dir_all(dir.join("emb")).unwrap();
    let err = format!("{:#}", task(EmbeddingSource::Stored).err().unwrap());
    assert!(err.contains("data.train") && err.contains("emb"), "{err}");
}

#[test]
fn dry_run_counts_the_paper_decoder_without_building_it() {
    let decoder = env!("CARGO_BIN_EXE_train-decoder");
    let out = dry_run_committed(decoder, "configs/paper/decoder.yaml");
    assert!(out.contains("counted from the config"), "{out}");
    let total = dry_run_total(&out);
    // GLIDE's 64×64 UNet at 512 channels (~2.3 B; the paper's 3.5 B adds its 1.2 B caption
    // transformer, which this layout takes from CLIP).
    assert!((2_200_000_000..2_300_000_000).contains(&total), "{total}");
    // Its training state: 20 bytes a parameter (fp32 weights, gradients, AdamW's two moments,
    // EMA); the config's ZeRO-2 over 8 ranks keeps 4 + 16 / 8 of them.
    let gib = |bytes: f64| format!("{:.1} GiB", total as f64 * bytes / (1u64 << 30) as f64);
    let state = format!(
        "training state per process: {}, sharded over 8 ranks (distributed.shard_optimizer, \
         shard_gradients; {} unsharded)",
        gib(6.0),
        gib(20.0)
    );
    assert!(out.contains(&state), "{state} in {out}");
    // The paper's bf16 stays bf16; the shapes config's `auto` says what it picks here and why.
    assert!(out.contains("precision bf16"), "{out}");
    let out = dry_run_committed(decoder, "configs/shapes/decoder.yaml");
    let auto = unclip_train::precision::resolve(
        unclip_train::precision::Precision::Auto,
        tch::Device::Cpu,
    );
    let line = format!("precision {}", auto.precision.name());
    assert!(out.contains(&line), "{out}");
    assert!(out.contains(&auto.note.unwrap()), "{out}");
}

/// `train-decoder` as 2 Gloo ranks on loopback (as `torchrun --nproc-per-node 2` starts it);
/// panics with every rank's output unless both succeed. Returns their outputs.
#[test]
fn train_decoder_runs_data_parallel_and_resumes_exactly() {
    let _serial = serial();
    let (tmp, config) = tiny_setup();
    let dir = tmp.path();
    let decoder = env!("CARGO_BIN_EXE_train-decoder");
    let full = dir.join("full");
    let outputs = launch_two_ranks(decoder, &config, &full, "40", false);
    let out = &outputs[0];
    check_run(out, &full);
    // Each rank reads its own one of the two shards: an epoch is 24 samples, not 48.
    assert!(out.contains("epoch 0 done on rank 0: 24 samples"), "{out}");
    // Rank 1 trains but neither samples nor checkpoints.
    assert!(
        outputs[1].contains("epoch 0 done on rank 1: 24 samples"),
        "{}",
        outputs[1]
    );
    for what in ["samples step", "checkpoint "] {
        assert!(
            out.contains(what) && !outputs[1].contains(what),
            "{what}: {}",
            outputs[1]
        );
    }
    // Interrupted at step 20 and resumed by both ranks: the same weights, EMA and optimiser state
    // (every rank's data position and generator come back, not only rank 0's) — with the
    // averaged gradients, optimiser state and EMA sharded over the ranks (ZeRO-2), which changes
    // no update.
    let split = dir.join("split");
    let zero = [
        "distributed.shard_optimizer=true",
        "distributed.shard_gradients=true",
    ];
    launch_two_ranks_with(decoder, &config, &split, "20", false, &zero);
    let outputs = launch_two_ranks_with(decoder, &config, &split, "40", true, &zero);
    assert!(outputs[0].contains("ZeRO-2"), "{}", outputs[0]);
    same_step_40(
        &full,
        &split,
        &[
            "model.safetensors",
            "ema.safetensors",
            "optimizer.safetensors",
        ],
    );
}
