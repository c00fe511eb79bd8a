//! The trainer's `images` hook sees the EMA weights, and training continues on the live ones.
mod common;
use anyhow::Result;
use tch::{nn, Device, Kind, Tensor};
use unclip_train::config::{parse_config, Validate};
use unclip_train::{StepOutput, TrainTask};

#[derive(Debug, Clone, serde::Deserialize)]
struct NoTaskSections {}
impl Validate for NoTaskSections {}

/// Pulls `w` towards 1; `images` records the value it sees.
struct PullToOne {
    w: Tensor,
    seen: Vec<f64>,
}

impl TrainTask for PullToOne {
    type Batch = ();
    fn next_batch(&mut self, _: u64, _: usize) -> Result<()> {
        Ok(())
    }
    fn loss(&mut self, _: &()) -> Result<StepOutput> {
        Ok(StepOutput {
            loss: (&self.w - 1.0).square().sum(Kind::Float),
            samples: 1,
            metrics: vec![],
        })
    }
    fn images(&mut self, _step: u64) -> Result<Vec<(String, Tensor)>> {
        self.seen.push(self.w.double_value(&[0]));
        Ok(Vec::new())
    }
}

#[test]
fn images_hook_runs_with_ema_weights_swapped_in() {
    let yaml = "device: cpu
train: {steps: 4, lr: 0.1, warmup_steps: 0, weight_decay: 0.0, grad_clip: null, ema_decay: 0.5, ema_warmup: false}
logging: {progress: off, tensorboard: false, images_every: 2}
checkpoint: {every: 2, keep_last: 5}
";
    let cfg = parse_config::<NoTaskSections>(yaml, &[]).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().zeros("w", &[1]);
    let mut task = PullToOne {
        w: w.shallow_clone(),
        seen: Vec::new(),
    };
    let (summary, tmp) = common::train_in_temp_dir(&mut task, &vs, &cfg);
    assert_eq!(task.seen.len(), 2);
    for (i, step) in [2u64, 4].iter().enumerate() {
        let ck =
            unclip_train::checkpoint::load(&tmp.path().join(format!("checkpoints/step-{step:09}")))
                .unwrap();
        let ema = ck.ema.as_ref().unwrap()["w"].double_value(&[0]);
        let live = ck.model["w"].double_value(&[0]);
        assert_eq!(
            task.seen[i], ema,
            "step {step}: the hook saw the EMA weight"
        );
        assert!(
            (live - ema).abs() > 1e-3,
            "step {step}: live {live} vs EMA {ema}"
        );
    }
    // The live weight was restored after each hook: training ended where the checkpoint says.
    let last = summary.last_checkpoint.unwrap();
    let ck = unclip_train::checkpoint::load(&last).unwrap();
    assert_eq!(w.double_value(&[0]), ck.model["w"].double_value(&[0]));
}
