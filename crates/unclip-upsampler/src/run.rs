//! A trained upsampler from a `train-upsampler` run directory, for inference.

use std::path::Path;

use anyhow::Result;
use tch::{nn, Device, Tensor};
use unclip_diffusion::SamplerConfig;

use crate::model::Upsampler;
use crate::sample::UpsamplerSampler;
use crate::task::UpsamplerTrainConfig;

/// A run's resolved config and the weights of one of its checkpoints, frozen.
pub struct UpsamplerRun {
    pub cfg: UpsamplerTrainConfig,
    pub vs: nn::VarStore,
    pub model: Upsampler,
    /// The checkpoint and which weights, for messages.
    pub source: String,
    /// Another model for the last sampling step (a diffusers pipeline's `super_res_last`).
    pub last_step: Option<LastStepModel>,
}

/// The weights [`UpsamplerRun::last_step`] runs, frozen.
pub struct LastStepModel {
    pub vs: nn::VarStore,
    pub model: Upsampler,
    pub source: String,
}

impl UpsamplerRun {
    /// `run_dir/config.yaml` and `checkpoint`'s weights, or the newest complete checkpoint's (EMA
    /// weights when present).
    pub fn load(run_dir: &Path, checkpoint: Option<&Path>, device: Device) -> Result<Self> {
        let (cfg, vs, model, source) = unclip_train::checkpoint::load_frozen_run(
            run_dir,
            checkpoint,
            "train-upsampler",
            device,
            |p, cfg: &UpsamplerTrainConfig| Upsampler::new(p, &cfg.upsampler.model),
        )?;
        Ok(Self {
            cfg,
            vs,
            model,
            source,
            last_step: None,
        })
    }

    /// The side it takes.
    pub fn low_resolution(&self) -> i64 {
        i64::from(self.cfg.upsampler.low_res.resolution)
    }

    /// The side it produces.
    pub fn resolution(&self) -> i64 {
        i64::from(self.cfg.resolution())
    }

    /// Upsamples `low` [B, 3, h, w] in [-1, 1] with the run's sampler from `noise` [B, 3, H, W].
    pub fn upsample(&self, low: &Tensor, noise: Tensor) -> Result<Tensor> {
        self.sampler(&self.cfg.upsampler.sampling)?
            .upsample(low, noise)
    }

    /// The run's sampler with `sampling`, its last step on [`UpsamplerRun::last_step`] if any.
    pub fn sampler(&self, sampling: &SamplerConfig) -> Result<UpsamplerSampler<'_>> {
        let sampler = UpsamplerSampler::new(&self.model, &self.cfg.upsampler.diffusion, sampling)?;
        Ok(sampler.with_last_step(self.last_step.as_ref().map(|l| &l.model)))
    }
}
