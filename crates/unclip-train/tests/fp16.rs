//! fp16 autocast with dynamic loss scaling through the trainer, against torch.amp.GradScaler
//! (scripts/fixtures/runtime.py): the same steps skipped for overflow, the same final weights and
//! scale; and a resumed fp16 run continues with the saved scale.
mod common;

use anyhow::Result;
use common::fixture;
use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};
use unclip_train::config::{parse_config, Validate};
use unclip_train::precision::{autocast, Precision};
use unclip_train::{train, StepOutput, TrainTask};

#[derive(Debug, Clone, serde::Deserialize)]
struct NoTaskSections {}
impl Validate for NoTaskSections {}

/// The fixture's regression: step k fits `t[k]` from `x[k]` with one linear layer.
struct Regression {
    w: Tensor,
    b: Tensor,
    x: Tensor,
    t: Tensor,
}

impl TrainTask for Regression {
    type Batch = (Tensor, Tensor);
    fn next_batch(&mut self, step: u64, _: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.x.get(step as i64), self.t.get(step as i64)))
    }
    fn loss(&mut self, (x, t): &(Tensor, Tensor)) -> Result<StepOutput> {
        let y = x.linear(&self.w, Some(&self.b));
        assert_ne!(y.kind(), Kind::Float, "autocast is on in loss()");
        Ok(StepOutput {
            loss: (y.to_kind(Kind::Float) - t).square().mean(Kind::Float),
            samples: 8,
            metrics: vec![],
        })
    }
}

const TRAIN: &str = "device: cpu
train: {steps: 10, lr: 0.05, grad_clip: 10.0, ema_decay: null, precision: fp16,
        loss_scale: {init: 1048576.0, growth_interval: 3}}
logging: {progress: off, tensorboard: false}
checkpoint: {every: 4, keep_last: 5}
";

/// Trains the fixture's problem into `dir`; returns (weight, bias, summary).
fn run(
    f: &HashMap<String, Tensor>,
    dir: &std::path::Path,
    overrides: &[&str],
    resume: Option<&str>,
) -> (Tensor, Tensor, unclip_train::TrainSummary) {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = parse_config::<NoTaskSections>(TRAIN, &o).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root() / "lin";
    let w = p.zeros("weight", &[3, 4]);
    let b = p.zeros("bias", &[3]);
    tch::no_grad(|| {
        w.shallow_clone().copy_(&f["init/lin.weight"]);
        b.shallow_clone().copy_(&f["init/lin.bias"]);
    });
    let mut task = Regression {
        w: w.shallow_clone(),
        b: b.shallow_clone(),
        x: f["x"].shallow_clone(),
        t: f["t"].shallow_clone(),
    };
    let summary = train(&mut task, &vs, &cfg.runtime, &cfg.resolved, dir, resume).unwrap();
    (w, b, summary)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn loss_scaling_matches_torch_grad_scaler() {
    let f = fixture("fp16.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let (w, b, summary) = run(&f, tmp.path(), &[], None);
    assert!(max_diff(&w, &f["after/lin.weight"]) < 1e-6, "weight");
    assert!(max_diff(&b, &f["after/lin.bias"]) < 1e-6, "bias");
    // The same steps were skipped, none of them counted as a failure.
    let skipped = Vec::<i64>::try_from(&f["skipped"]).unwrap();
    let taken: Vec<i64> = summary.losses.iter().map(|l| l.0 as i64).collect();
    assert_eq!(
        taken,
        (0..10).filter(|k| !skipped.contains(k)).collect::<Vec<_>>()
    );
    assert_eq!(summary.nonfinite_skipped, 0);
    let meta = unclip_train::checkpoint::load(summary.last_checkpoint.as_ref().unwrap())
        .unwrap()
        .meta;
    let state = meta.loss_scale.expect("fp16 checkpoints store the scaler");
    assert_eq!(state.scale, f["scale"].double_value(&[0]));
    assert_eq!(state.overflows, skipped.len() as u64);

    // Without loss scaling (bf16) nothing is skipped: the skips above are the scaler's doing.
    let (_, _, bf16) = run(
        &f,
        &tmp.path().join("bf16"),
        &["train.precision=bf16"],
        None,
    );
    assert_eq!(bf16.losses.len(), 10);
}

#[test]
fn a_resumed_fp16_run_keeps_its_scale() {
    let f = fixture("fp16.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let (w_whole, b_whole, _) = run(&f, &tmp.path().join("whole"), &[], None);
    let dir = tmp.path().join("split");
    let _ = run(&f, &dir, &["train.steps=4"], None);
    let (w, b, resumed) = run(&f, &dir, &[], Some("auto"));
    assert!(resumed.resumed_from.is_some());
    assert!(
        w.equal(&w_whole) && b.equal(&b_whole),
        "4 + 6 steps == 10 steps"
    );
}

#[test]
fn fp16_autocast_matches_pytorch() {
    let a = fixture("autocast.safetensors");
    let f = fixture("fp16.safetensors");
    let _guard = autocast(Device::Cpu, Precision::Fp16);
    let lin = a["x"].linear(&a["w"], Some(&a["bias"]));
    assert_eq!(lin.kind(), Kind::Half);
    assert!(lin.to_kind(Kind::Float).equal(&f["linear_fp16"]));
}
