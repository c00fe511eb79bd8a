//! Sampling with an upsampler: the whole high-resolution image from noise, the upsampled
//! low-resolution image concatenated at every step, no guidance (SPEC: DDIM, 27 steps for
//! 64→256 and 15 for 256→1024).

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};
use unclip_diffusion::{
    ClipDenoised, DiffusionConfig, GaussianDiffusion, SamplerConfig, SamplerKind,
};

use crate::low_res::upsample_condition;
use crate::model::Upsampler;

pub struct UpsamplerSampler<'a> {
    model: &'a Upsampler,
    /// The model of the last step, where it is another (Karlo's `super_res_last`).
    last_step: Option<&'a Upsampler>,
    diffusion: GaussianDiffusion,
    kind: SamplerKind,
    clip: ClipDenoised,
}

impl<'a> UpsamplerSampler<'a> {
    /// `diffusion` is the process the upsampler was trained with; `sampling` picks sampler and
    /// steps.
    pub fn new(
        model: &'a Upsampler,
        diffusion: &DiffusionConfig,
        sampling: &SamplerConfig,
    ) -> Result<Self> {
        let (process, kind) = sampling.build(diffusion)?;
        let device = model.unet.device();
        Ok(Self {
            model,
            last_step: None,
            diffusion: process.to_device(device),
            kind,
            clip: sampling.clip,
        })
    }

    /// Runs `model` for the last step instead of the sampler's, as diffusers' UnCLIPPipeline runs
    /// `super_res_last` (None: every step runs the sampler's model).
    pub fn with_last_step(mut self, model: Option<&'a Upsampler>) -> Self {
        self.last_step = model;
        self
    }

    /// Images [B, 3, H, W] in [-1, 1] from the low-resolution images `low` [B, 3, h, w] in
    /// [-1, 1] and `noise` [B, 3, H, W] (H the output side).
    pub fn upsample(&self, low: &Tensor, noise: Tensor) -> Result<Tensor> {
        let (b, _, h, w) = noise.size4()?;
        ensure!(
            h == w && low.size4()?.0 == b,
            "upsampling: {} low-resolution images for noise {:?} (square images)",
            low.size()[0],
            noise.size()
        );
        let _g = tch::no_grad_guard();
        let cond = upsample_condition(&low.to_device(noise.device()), h).to_kind(noise.kind());
        let last = self.diffusion.num_timesteps() - 1;
        // Every sampler calls the model once per step, so call `last` is the last step's.
        let mut calls = 0;
        let x = self.diffusion.sample_from(
            self.kind,
            &self.clip,
            noise,
            last,
            |x: &Tensor, t: &Tensor| {
                let m = match self.last_step {
                    Some(m) if calls == last => m,
                    _ => self.model,
                };
                calls += 1;
                m.forward_t(x, &cond, t, false)
            },
            None,
        )?;
        Ok(x.to_kind(Kind::Float).clamp(-1.0, 1.0))
    }
}
