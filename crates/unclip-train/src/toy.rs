//! The 2-D diffusion toy as a [`TrainTask`]: the smallest real job for the runtime, used by the
//! `train_toy` example (the project's main job until the real trainers land) and the tests.

use crate::config::Validate;
use crate::trainer::{StepOutput, TrainTask};
use anyhow::{anyhow, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};
use unclip_diffusion::toy::{RingOfGaussians, ToyDenoiser};
use unclip_diffusion::{DiffusionConfig, GaussianDiffusion, SamplerConfig, VarianceType};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyModelConfig {
    pub hidden: i64,
    pub depth: usize,
}

/// The task's sections of a toy run config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyConfig {
    pub model: ToyModelConfig,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    /// How the example samples the trained model (none: no sampling).
    #[serde(default)]
    pub sampling: Option<SamplerConfig>,
}

impl Validate for ToyConfig {
    fn validate(&self) -> Result<()> {
        ensure!(
            self.model.hidden > 0,
            "model.hidden must be > 0, got {}",
            self.model.hidden
        );
        self.diffusion
            .validate()
            .map_err(|e| anyhow!("diffusion: {e}"))?;
        if let Some(s) = &self.sampling {
            s.validate().map_err(|e| anyhow!("sampling: {e}"))?;
            s.steps
                .timesteps(self.diffusion.timesteps)
                .map_err(|e| anyhow!("sampling.steps: {e}"))?;
        }
        Ok(())
    }
}

pub struct ToyTask {
    pub model: ToyDenoiser,
    pub diffusion: GaussianDiffusion,
    pub data: RingOfGaussians,
    batch: i64,
    device: tch::Device,
    config: ToyConfig,
    /// Scores of the last `images` call's samples.
    sample_scalars: Vec<(String, f64)>,
}

impl ToyTask {
    /// Builds the denoiser under `denoiser.` in `vs`, on `vs`'s device.
    pub fn new(vs: &nn::VarStore, cfg: &ToyConfig, batch: usize) -> Result<Self> {
        let out = if cfg.diffusion.variance == VarianceType::LearnedRange {
            4
        } else {
            2
        };
        Ok(Self {
            model: ToyDenoiser::new(
                vs.root() / "denoiser",
                cfg.model.hidden,
                cfg.model.depth,
                out,
            ),
            diffusion: GaussianDiffusion::new(&cfg.diffusion)?.to_device(vs.device()),
            data: RingOfGaussians::default(),
            sample_scalars: Vec::new(),
            batch: batch as i64,
            device: vs.device(),
            config: cfg.clone(),
        })
    }
}

impl TrainTask for ToyTask {
    type Batch = Tensor;

    fn next_batch(&mut self, _step: u64, _micro: usize) -> Result<Tensor> {
        Ok(self.data.sample(self.batch, self.device))
    }

    fn loss(&mut self, x0: &Tensor) -> Result<StepOutput> {
        let t = self.diffusion.sample_timesteps(self.batch, self.device);
        let noise = x0.randn_like();
        let xt = self.diffusion.q_sample(x0, &t, &noise)?;
        let out = self.model.forward(&xt, &t)?;
        let per_sample = self
            .diffusion
            .training_losses(&out, x0, &xt, &t, &noise)?
            .loss;
        let metrics = unclip_diffusion::gaussian::loss_per_quarter(
            &per_sample,
            &t,
            self.diffusion.num_timesteps(),
        )?;
        Ok(StepOutput {
            loss: per_sample.mean(Kind::Float),
            samples: self.batch as usize,
            metrics,
        })
    }

    /// A scatter plot of 1024 samples from the current weights, with the configured sampler
    /// (DDIM over 20 steps without one).
    fn images(&mut self, _step: u64) -> Result<Vec<(String, Tensor)>> {
        let default = SamplerConfig {
            sampler: unclip_diffusion::SamplerName::Ddim,
            steps: "20".into(),
            eta: None,
            clip: unclip_diffusion::ClipDenoised::Static(1.5),
        };
        let sampling = self.config.sampling.clone().unwrap_or(default);
        let (sampler, kind) = sampling.build(&self.config.diffusion)?;
        let sampler = sampler.to_device(self.device);
        let noise = Tensor::randn([1024, 2], (Kind::Float, self.device));
        let model = &self.model;
        let x = sampler.sample(
            kind,
            &sampling.clip,
            noise,
            |x: &Tensor, t: &Tensor| model.forward(x, t),
            None,
        )?;
        let score = self.data.score(&x);
        self.sample_scalars = vec![
            ("samples/mean_distance".into(), score.mean_distance),
            ("samples/near_fraction".into(), score.near_fraction),
        ];
        Ok(vec![(
            "samples".to_string(),
            unclip_diffusion::toy::scatter_image(&x, 128)?,
        )])
    }

    /// How well the last scatter plot's samples match the ring (no learned model).
    fn sample_scalars(&mut self) -> Vec<(String, f64)> {
        std::mem::take(&mut self.sample_scalars)
    }
}
