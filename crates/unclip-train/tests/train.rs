//! The whole runtime on a 2-D diffusion toy: the loss falls, a crash + `--resume auto` ends
//! bit-identical to an uninterrupted run, logs read back with TensorBoard's own reader,
//! checkpoints are atomic and pruned, non-finite steps are skipped and then stop the run.
mod common;

use common::*;
use std::collections::HashMap;
use tch::{nn, Device, Tensor};
use unclip_testkit::read_scalars;
use unclip_train::checkpoint::{self, checkpoints_dir, CheckpointMeta, RetentionPolicy};
use unclip_train::config::parse_config;
use unclip_train::toy::ToyConfig;
use unclip_train::{train, RunConfig};

/// libtorch's generator is process-wide and tests run on parallel threads: one run at a time.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn config(overrides: &[&str]) -> RunConfig<ToyConfig> {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    parse_config(CONFIG, &o).unwrap()
}

fn run(
    cfg: &RunConfig<ToyConfig>,
    dir: &std::path::Path,
    crash_at: Option<u64>,
    resume: Option<&str>,
) -> (nn::VarStore, anyhow::Result<unclip_train::TrainSummary>) {
    tch::manual_seed(123); // the initial weights
    let vs = nn::VarStore::new(Device::Cpu);
    let mut task = FaultyToy::new(&vs, &cfg.task, cfg.runtime.train.batch_size);
    task.crash_at = crash_at;
    let summary = train(&mut task, &vs, &cfg.runtime, &cfg.resolved, dir, resume);
    (vs, summary)
}

fn tensors_of(dir: &std::path::Path, file: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join(file))
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_bit_identical(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (k, t) in a {
        assert!(t.equal(&b[k]), "{what}: `{k}` differs");
    }
}

#[test]
fn loss_falls_and_crash_then_resume_is_bit_identical() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&["train.grad_accum=2"]);
    let (_, whole) = run(&cfg, &tmp.path().join("whole"), None, None);
    let whole = whole.unwrap();
    let mean = |s: &[(u64, f64)]| s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&whole.losses[..5]), mean(&whole.losses[30..]));
    assert!(last < 0.8 * first, "loss {first:.3} -> {last:.3}");
    assert_eq!(whole.final_step, 40);

    let dir = tmp.path().join("crashed");
    let (_, crashed) = run(&cfg, &dir, Some(25), None);
    assert!(crashed
        .unwrap_err()
        .to_string()
        .contains("simulated crash at step 25"));
    let (_, resumed) = run(&cfg, &dir, None, Some("auto"));
    let resumed = resumed.unwrap();
    assert_eq!(
        resumed.resumed_from.as_deref(),
        Some(checkpoints_dir(&dir).join("step-000000020").as_path())
    );
    assert_eq!(resumed.losses.first().map(|l| l.0), Some(20));

    let a = checkpoints_dir(&tmp.path().join("whole")).join("step-000000040");
    let b = checkpoints_dir(&dir).join("step-000000040");
    for file in [
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
    ] {
        assert_bit_identical(&tensors_of(&a, file), &tensors_of(&b, file), file);
    }
    // The losses of steps 20..40 are the same numbers too.
    assert_eq!(&whole.losses[20..], &resumed.losses[..]);
    // The model weights differ from the EMA (the EMA is really averaging).
    let (m, e) = (
        tensors_of(&a, "model.safetensors"),
        tensors_of(&a, "ema.safetensors"),
    );
    assert!(m.iter().any(|(k, t)| !t.equal(&e[k])));
}

#[test]
fn checkpoints_are_pruned_resume_ignores_partial_ones_config_is_recorded_and_runs_do_not_mix() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = config(&["checkpoint.milestone_every=20", "train.lr=1e-3"]);
    run(&cfg, &dir, None, None).1.unwrap();
    let steps: Vec<u64> = checkpoint::list(&checkpoints_dir(&dir))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        steps,
        vec![20, 30, 40],
        "keep_last 2 plus the milestone at 20"
    );
    let written: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("config.yaml")).unwrap()).unwrap();
    assert_eq!(written["train"]["lr"].as_f64(), Some(1e-3));
    let meta: CheckpointMeta = serde_json::from_slice(
        &std::fs::read(checkpoints_dir(&dir).join("step-000000040/meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!((meta.step, meta.ema_updates, meta.seed), (40, 40, 7));
    assert_eq!(meta.config["train"]["lr"].as_f64(), Some(1e-3));

    // A fresh run (no --resume) into a directory that holds checkpoints is refused before it
    // writes anything: its own would be pruned as the oldest and `--resume auto` would continue
    // the old run.
    let other = config(&["train.lr=5e-4"]);
    let err = run(&other, &dir, None, None).1.unwrap_err().to_string();
    assert!(
        err.contains("already holds checkpoints") && err.contains("step-000000040"),
        "{err}"
    );
    let kept: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("config.yaml")).unwrap()).unwrap();
    assert_eq!(
        kept["train"]["lr"].as_f64(),
        Some(1e-3),
        "config.yaml untouched"
    );

    // A crash mid-write leaves a hidden partial directory, or a step dir without meta.json.
    let root = checkpoints_dir(&dir);
    std::fs::create_dir_all(root.join(".step-000000050.partial")).unwrap();
    std::fs::create_dir_all(root.join("step-000000060")).unwrap();
    std::fs::write(root.join("step-000000060/model.safetensors"), b"truncated").unwrap();
    assert_eq!(
        checkpoint::latest(&root).unwrap(),
        Some(root.join("step-000000040"))
    );
    let err = unclip_train::trainer::resolve_resume(
        &dir,
        Some(root.join("step-000000060").to_str().unwrap()),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("not a checkpoint directory"),
        "{err}"
    );

    // Retention on its own: without milestones only the newest N stay.
    RetentionPolicy {
        keep_last: 1,
        milestone_every: None,
    }
    .prune(&root)
    .unwrap();
    let left: Vec<u64> = checkpoint::list(&root)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(left, vec![40]);
}

#[test]
fn tensorboard_reads_the_scalars_back() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = config(&["logging.images_every=20"]);
    let summary = run(&cfg, &dir, None, None).1.unwrap();
    let scalars = read_scalars(&dir.join("tensorboard"));
    let text = format!("{:?}", scalars.keys().collect::<Vec<_>>());
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/samples_per_sec",
        "perf/data_wait_fraction",
        "train/nonfinite_skipped",
        "train/loss_q0",
        "train/loss_q3",
    ] {
        for step in (5..=40).step_by(5) {
            assert!(
                scalars.contains_key(&(tag.to_string(), step)),
                "{tag} at {step} missing from:\n{text}"
            );
        }
    }
    // train/loss at step 10 is the mean of steps 5..10's losses.
    let want = summary.losses[5..10].iter().map(|l| l.1).sum::<f64>() / 5.0;
    let got = scalars[&("train/loss".to_string(), 10)];
    assert!(
        (got - want).abs() < 1e-5 * want.abs(),
        "logged {got} vs {want}"
    );
    // metrics.jsonl holds the same scalars, a line per logged step (and per sample set).
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut seen = 0;
    for line in &lines {
        let step = line["step"].as_u64().unwrap();
        assert!(line["time"].as_f64().unwrap() > 1.7e9, "{line}");
        for (tag, v) in line.as_object().unwrap() {
            if tag == "step" || tag == "time" {
                continue;
            }
            let tb = scalars[&(tag.clone(), step)];
            let v = v.as_f64().unwrap();
            // TensorBoard keeps f32.
            assert!(
                (tb - v).abs() <= 1e-6 * v.abs().max(1e-3),
                "{tag} at {step}: {v} vs {tb}"
            );
            seen += 1;
        }
    }
    assert_eq!(
        seen,
        scalars.len(),
        "every TensorBoard scalar is in metrics.jsonl"
    );
    assert_eq!(lines.len(), 8 + 2, "8 logged steps and 2 sample sets");
    let frac = scalars[&("perf/data_wait_fraction".to_string(), 40)];
    assert!((0.0..=1.0).contains(&frac));
    // The task's scores of its samples, at the image steps only.
    for tag in ["samples/mean_distance", "samples/near_fraction"] {
        let steps: Vec<u64> = scalars
            .keys()
            .filter(|(t, _)| t == tag)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(steps.len(), 2, "{tag}: {text}");
        assert!(
            steps.contains(&20) && steps.contains(&40),
            "{tag}: {steps:?}"
        );
    }
    let near = scalars[&("samples/near_fraction".to_string(), 40)];
    assert!((0.0..=1.0).contains(&near), "{near}");
    // The task's scatter plots, at steps 20 and 40, decode as 128×128 PNGs.
    let script = r#"
import io, sys
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1]); ea.Reload()
for e in ea.Images("samples"):
    img = Image.open(io.BytesIO(e.encoded_image_string))
    px = list(img.convert("RGB").getdata())
    print(e.step, img.size[0], img.size[1], px.count((255, 255, 255)), px.count((20, 60, 200)))
"#;
    let text = unclip_testkit::python(script, [dir.join("tensorboard")]);
    let rows: Vec<Vec<u64>> = text
        .lines()
        .map(|l| l.split(' ').map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        rows.iter().map(|r| r[0]).collect::<Vec<_>>(),
        vec![20, 40],
        "{text}"
    );
    for r in &rows {
        assert_eq!((r[1], r[2]), (128, 128), "{text}");
        // White background with the samples drawn in blue, and nothing else.
        assert!(
            r[3] > 128 * 128 / 2 && r[4] > 0 && r[3] + r[4] == 128 * 128,
            "{text}"
        );
    }
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&["train.max_nonfinite_steps=3"]);
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut task = FaultyToy::new(&vs, &cfg.task, 64);
    task.poison = vec![3, 4];
    let summary = train(
        &mut task,
        &vs,
        &cfg.runtime,
        &cfg.resolved,
        &tmp.path().join("a"),
        None,
    )
    .unwrap();
    assert_eq!(summary.nonfinite_skipped, 2);
    assert_eq!(summary.losses.len(), 38);
    assert!(summary.losses.iter().all(|l| l.1.is_finite()));
    for (_, v) in vs.variables() {
        assert!(
            v.isfinite().all().int64_value(&[]) == 1,
            "weights stayed finite"
        );
    }

    let vs = nn::VarStore::new(Device::Cpu);
    let mut task = FaultyToy::new(&vs, &cfg.task, 64);
    task.poison = (12..20).collect();
    let err = train(
        &mut task,
        &vs,
        &cfg.runtime,
        &cfg.resolved,
        &tmp.path().join("b"),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("3 consecutive steps had a non-finite loss"),
        "{err}"
    );
    assert!(
        err.contains("step-000000010"),
        "names the intact checkpoint: {err}"
    );
}
