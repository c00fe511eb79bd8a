//! The runtime's toy task with fault injection, shared by the tests.
#![allow(dead_code)]

use anyhow::Result;
use std::collections::HashMap;
use tch::{nn, Tensor};
use unclip_train::config::RunConfig;
use unclip_train::toy::{ToyConfig, ToyTask};
use unclip_train::{train, StepOutput, TrainSummary, TrainTask};

pub const CONFIG: &str = "
seed: 7
device: cpu
model: {hidden: 64, depth: 2}
diffusion: {schedule: cosine, timesteps: 1000}
train: {steps: 40, batch_size: 64, lr: 2.0e-3, warmup_steps: 5, lr_schedule: cosine, weight_decay: 0.01, ema_decay: 0.99}
logging: {every: 5, progress: off}
checkpoint: {every: 10, keep_last: 2}
";

/// A reference fixture of `tests/fixtures/` (written by scripts/fixtures/runtime.py), by name.
pub fn fixture(file: &str) -> HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{} (run scripts/fixtures/runtime.py): {e}", path.display()))
        .into_iter()
        .collect()
}

/// [`ToyTask`] that can crash in `next_batch`, send its own process a signal there, or return a
/// NaN loss at chosen steps.
pub struct FaultyToy {
    pub inner: ToyTask,
    pub crash_at: Option<u64>,
    /// (step, signal number)
    pub signal_at: Option<(u64, i32)>,
    /// Send it twice.
    pub signal_twice: bool,
    pub poison: Vec<u64>,
    step: u64,
}

impl FaultyToy {
    pub fn new(vs: &nn::VarStore, cfg: &ToyConfig, batch: usize) -> Self {
        Self {
            inner: ToyTask::new(vs, cfg, batch).unwrap(),
            crash_at: None,
            signal_at: None,
            signal_twice: false,
            poison: Vec::new(),
            step: 0,
        }
    }
}

impl TrainTask for FaultyToy {
    type Batch = Tensor;
    fn next_batch(&mut self, step: u64, micro: usize) -> Result<Tensor> {
        if Some(step) == self.crash_at {
            anyhow::bail!("simulated crash at step {step}");
        }
        if let Some((at, signal)) = self.signal_at {
            if at == step && micro == 0 {
                for _ in 0..if self.signal_twice { 2 } else { 1 } {
                    // SAFETY: raise only delivers the signal to this process, whose handlers are
                    // set.
                    assert_eq!(unsafe { libc::raise(signal) }, 0);
                }
            }
        }
        self.step = step;
        self.inner.next_batch(step, micro)
    }
    fn loss(&mut self, batch: &Tensor) -> Result<StepOutput> {
        let mut out = self.inner.loss(batch)?;
        if self.poison.contains(&self.step) {
            out.loss *= f64::NAN;
        }
        Ok(out)
    }
    fn images(&mut self, step: u64) -> Result<Vec<(String, Tensor)>> {
        self.inner.images(step)
    }
    fn sample_scalars(&mut self) -> Vec<(String, f64)> {
        self.inner.sample_scalars()
    }
}

/// `train` from the start with `cfg`'s runtime in a fresh temporary run directory, returned with
/// the summary (it is removed when dropped).
pub fn train_in_temp_dir<T: TrainTask, C>(
    task: &mut T,
    vs: &nn::VarStore,
    cfg: &RunConfig<C>,
) -> (TrainSummary, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let summary = train(task, vs, &cfg.runtime, &cfg.resolved, tmp.path(), None).unwrap();
    (summary, tmp)
}
