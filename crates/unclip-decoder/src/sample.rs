//! Sampling 64×64 images from the decoder: a respaced process walked by a sampler from the core,
//! classifier-free guidance against the fully unconditional row (learned null z_i, empty caption)
//! on the ε channels, the variance taken from the conditional branch (GLIDE / diffusers UnCLIP).

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};
use unclip_clip::caption::TextCondition;
use unclip_diffusion::{
    classifier_free_guidance, ClipDenoised, DiffusionConfig, GaussianDiffusion, SamplerConfig,
    SamplerKind,
};

use crate::model::{DecoderCondition, UnclipDecoder};

pub struct DecoderSampler<'a> {
    decoder: &'a UnclipDecoder,
    diffusion: GaussianDiffusion,
    kind: SamplerKind,
    clip: ClipDenoised,
}

impl<'a> DecoderSampler<'a> {
    /// `diffusion` is the process the decoder was trained with; `sampling` picks sampler and steps.
    pub fn new(
        decoder: &'a UnclipDecoder,
        diffusion: &DiffusionConfig,
        sampling: &SamplerConfig,
    ) -> Result<Self> {
        let (process, kind) = sampling.build(diffusion)?;
        let device = decoder
            .text_proj
            .learned_classifier_free_guidance_embeddings
            .device();
        Ok(Self {
            decoder,
            diffusion: process.to_device(device),
            kind,
            clip: sampling.clip,
        })
    }

    /// Images in [-1, 1] from `noise` [B, C, H, W] for the conditioning `cond` (B rows);
    /// `null_text` is the one-row empty caption. Guidance scale 1 is unguided.
    pub fn sample(
        &self,
        cond: &DecoderCondition,
        null_text: &TextCondition,
        guidance_scale: f64,
        noise: Tensor,
    ) -> Result<Tensor> {
        ensure!(
            guidance_scale.is_finite() && guidance_scale >= 0.0,
            "guidance scale must be finite and >= 0, got {guidance_scale}"
        );
        let b = noise.size()[0];
        ensure!(
            cond.len() == b,
            "decoder sampling: {} conditioning rows for {b} noise images",
            cond.len()
        );
        let _g = tch::no_grad_guard();
        let channels = noise.size()[1];
        let x = if guidance_scale == 1.0 {
            self.diffusion.sample(
                self.kind,
                &self.clip,
                noise,
                |x: &Tensor, t: &Tensor| self.decoder.forward_t(x, t, cond, false),
                None,
            )?
        } else {
            let both = cond.cat(&self.decoder.null_condition(null_text, b)?)?;
            let guided = classifier_free_guidance(
                |x: &Tensor, t: &Tensor| self.decoder.forward_t(x, t, &both, false),
                guidance_scale,
                channels,
            );
            self.diffusion
                .sample(self.kind, &self.clip, noise, guided, None)?
        };
        Ok(x.to_kind(Kind::Float).clamp(-1.0, 1.0))
    }
}
