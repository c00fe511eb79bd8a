//! A 2-D diffusion toy driven through the runtime, shared by the tests.
#![allow(dead_code)]

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};
use unclip_diffusion::toy::{RingOfGaussians, ToyDenoiser};
use unclip_diffusion::{DiffusionConfig, GaussianDiffusion};
use unclip_train::config::Validate;
use unclip_train::{StepOutput, TrainTask};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyModelConfig {
    pub hidden: i64,
    pub depth: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyConfig {
    pub model: ToyModelConfig,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
}

impl Validate for ToyConfig {
    fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.model.hidden > 0,
            "model.hidden must be > 0, got {}",
            self.model.hidden
        );
        self.diffusion
            .validate()
            .map_err(|e| anyhow::anyhow!("diffusion: {e}"))
    }
}

pub const CONFIG: &str = "
seed: 7
device: cpu
model: {hidden: 64, depth: 2}
diffusion: {schedule: cosine, timesteps: 1000}
train: {steps: 40, batch_size: 64, lr: 2.0e-3, warmup_steps: 5, lr_schedule: cosine, weight_decay: 0.01, ema_decay: 0.99}
logging: {every: 5, progress: off}
checkpoint: {every: 10, keep_last: 2}
";

pub struct ToyTask {
    pub model: ToyDenoiser,
    pub diffusion: GaussianDiffusion,
    pub data: RingOfGaussians,
    pub batch: i64,
    /// Steps at which the loss is replaced by NaN (to test the guards).
    pub poison: Vec<u64>,
    current_step: u64,
}

impl ToyTask {
    pub fn new(vs: &nn::VarStore, cfg: &ToyConfig, batch: usize) -> Self {
        Self {
            model: ToyDenoiser::new(vs.root() / "denoiser", cfg.model.hidden, cfg.model.depth, 2),
            diffusion: GaussianDiffusion::new(&cfg.diffusion).expect("valid diffusion"),
            data: RingOfGaussians::default(),
            batch: batch as i64,
            poison: Vec::new(),
            current_step: 0,
        }
    }
}

impl TrainTask for ToyTask {
    type Batch = Tensor;

    fn next_batch(&mut self, step: u64, _micro: usize) -> Result<Tensor> {
        self.current_step = step;
        Ok(self.data.sample(self.batch, Device::Cpu))
    }

    fn loss(&mut self, x0: Tensor) -> Result<StepOutput> {
        let t = self.diffusion.sample_timesteps(self.batch, Device::Cpu);
        let noise = x0.randn_like();
        let xt = self.diffusion.q_sample(&x0, &t, &noise)?;
        let out = self.model.forward(&xt, &t)?;
        let per_sample = self
            .diffusion
            .training_losses(&out, &x0, &xt, &t, &noise)?
            .loss;
        let mut loss = per_sample.mean(Kind::Float);
        if self.poison.contains(&self.current_step) {
            loss *= f64::NAN;
        }
        Ok(StepOutput {
            loss,
            samples: self.batch as usize,
            metrics: vec![],
        })
    }
}
