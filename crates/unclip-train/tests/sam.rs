//! SAM through the trainer against a PyTorch reference (scripts/fixtures/runtime.py).
mod common;

use anyhow::Result;
use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};
use unclip_train::config::{parse_config, Validate};
use unclip_train::{StepOutput, TrainTask};

#[derive(Debug, Clone, serde::Deserialize)]
struct NoTaskSections {}
impl Validate for NoTaskSections {}

struct Quadratic {
    w: Tensor,
    b: Tensor,
    m: Tensor,
    target: Tensor,
}

impl TrainTask for Quadratic {
    type Batch = ();
    fn next_batch(&mut self, _: u64, _: usize) -> Result<()> {
        Ok(())
    }
    fn loss(&mut self, _: &()) -> Result<StepOutput> {
        let (w, b) = (&self.w, &self.b);
        let loss = (w.matmul(&self.m).square().sum(Kind::Double) * 0.5)
            + (w * 3.0).sin().sum(Kind::Double)
            + (b - &self.target).square().sum(Kind::Double)
            + (b * w.get(0)).cos().sum(Kind::Double);
        Ok(StepOutput {
            loss,
            samples: 1,
            metrics: vec![],
        })
    }
}

/// Trains the fixture's problem for 5 steps with `train_yaml`; returns (weight, bias).
fn run(f: &HashMap<String, Tensor>, train_yaml: &str) -> (Tensor, Tensor) {
    let text = format!(
        "device: cpu\ntrain: {train_yaml}\nlogging: {{progress: off, tensorboard: false}}\n"
    );
    let cfg = parse_config::<NoTaskSections>(&text, &[]).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root() / "quad";
    let w = p.zeros("weight", &[2, 3]);
    let b = p.zeros("bias", &[3]);
    vs.double();
    tch::no_grad(|| {
        w.shallow_clone().copy_(&f["init/quad.weight"]);
        b.shallow_clone().copy_(&f["init/quad.bias"]);
    });
    let mut task = Quadratic {
        w: w.shallow_clone(),
        b: b.shallow_clone(),
        m: f["M"].shallow_clone(),
        target: f["target"].shallow_clone(),
    };
    let (_, _tmp) = common::train_in_temp_dir(&mut task, &vs, &cfg);
    (w, b)
}

#[test]
fn sam_steps_match_pytorch() {
    let f = common::fixture("sam.safetensors");
    let common = "steps: 5, lr: 0.1, weight_decay: 0.05, grad_clip: 10.0, ema_decay: null";
    let (w, b) = run(&f, &format!("{{{common}, sam_rho: 0.05}}"));
    let off = |t: &Tensor, name: &str| {
        (t - &f[&format!("after/{name}")])
            .abs()
            .max()
            .double_value(&[])
    };
    assert!(
        off(&w, "quad.weight") < 1e-10,
        "weight off by {}",
        off(&w, "quad.weight")
    );
    assert!(
        off(&b, "quad.bias") < 1e-10,
        "bias off by {}",
        off(&b, "quad.bias")
    );
    // Plain AdamW lands elsewhere, so the match above is SAM's doing.
    let (w, _) = run(&f, &format!("{{{common}}}"));
    assert!(off(&w, "quad.weight") > 1e-4, "SAM made no difference");
    let err = parse_config::<NoTaskSections>("train: {sam_rho: -1}", &[]).unwrap_err();
    assert!(format!("{err:#}").contains("train.sam_rho must be > 0"));
}
