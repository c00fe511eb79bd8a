//! Sampling 64×64 images from the decoder: a respaced process walked by a sampler from the core,
//! classifier-free guidance against the fully unconditional row (learned null z_i, empty caption)
//! on the ε channels, the variance taken from the conditional branch (GLIDE / diffusers UnCLIP).
//! A self-conditioned decoder is fed the guided x_0 estimate of the step before.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};
use unclip_clip::caption::TextCondition;
use unclip_diffusion::{
    classifier_free_guidance, self_conditioned, ClipDenoised, DiffusionConfig, FixedPoint,
    GaussianDiffusion, SamplerConfig, SamplerKind,
};

use crate::model::{DecoderCondition, UnclipDecoder};

/// A network-output closure: (x_t, model timesteps) → output.
type Model<'b> = Box<dyn FnMut(&Tensor, &Tensor) -> Result<Tensor> + 'b>;

pub struct DecoderSampler<'a> {
    decoder: &'a UnclipDecoder,
    diffusion: GaussianDiffusion,
    /// The unrespaced process: a self-conditioned decoder's x_0 estimates are read with it.
    training: GaussianDiffusion,
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
            training: GaussianDiffusion::new(diffusion)?.to_device(device),
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
        let last = self.diffusion.num_timesteps() - 1;
        self.sample_from(cond, null_text, guidance_scale, noise, last)
    }

    /// SDEdit (diffusers' img2img): `images` [B, C, H, W] in [-1, 1] noised with `noise` to the
    /// step `strength` in (0, 1] starts from (see [`DecoderSampler::strength_timestep`]), then
    /// denoised for `cond` as [`DecoderSampler::sample`] does. Small strengths keep the images'
    /// layout and outlines and ask the decoder only to finish them.
    pub fn denoise(
        &self,
        cond: &DecoderCondition,
        null_text: &TextCondition,
        guidance_scale: f64,
        images: &Tensor,
        strength: f64,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let start = self.diffusion.strength_start(strength)?;
        let t = Tensor::full(
            [images.size()[0]],
            start as i64,
            (Kind::Int64, images.device()),
        );
        let x = self.diffusion.q_sample(images, &t, noise)?;
        self.sample_from(cond, null_text, guidance_scale, x, start)
    }

    /// DDIM inversion of `images` [B, C, H, W] in [-1, 1] for `cond` (unCLIP's bipartite latent,
    /// SPEC.md *Image manipulations*): the x_T from which this sampler's steps walked by DDIM
    /// with η = 0 and the same guidance decode back to `images` (exactly as the fixed-point
    /// iterations converge; none is the classic inversion). Costs (1 + iterations) model calls
    /// per step.
    pub fn invert(
        &self,
        cond: &DecoderCondition,
        null_text: &TextCondition,
        guidance_scale: f64,
        images: &Tensor,
        fixed_point: FixedPoint,
    ) -> Result<Tensor> {
        ensure!(
            !self.decoder.self_condition,
            "DDIM inversion needs a decoder whose output depends on (x_t, t) alone; this one is \
             self-conditioned (decoder.model.self_condition) on the estimate of the step before"
        );
        let _g = tch::no_grad_guard();
        let model = self.model(cond, null_text, guidance_scale, images, "decoder inversion")?;
        let latents =
            self.diffusion
                .ddim_invert(images.to_kind(Kind::Float), fixed_point, model, None)?;
        Ok(latents.to_kind(Kind::Float))
    }

    /// The training timestep [`DecoderSampler::denoise`] starts from at `strength`.
    pub fn strength_timestep(&self, strength: f64) -> Result<i64> {
        let start = self.diffusion.strength_start(strength)?;
        Ok(self.diffusion.timestep_map()[start])
    }

    fn sample_from(
        &self,
        cond: &DecoderCondition,
        null_text: &TextCondition,
        guidance_scale: f64,
        noise: Tensor,
        start: usize,
    ) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let model = self.model(cond, null_text, guidance_scale, &noise, "decoder sampling")?;
        let x = self.run(noise, start, model)?;
        Ok(x.to_kind(Kind::Float).clamp(-1.0, 1.0))
    }

    /// The network output the samplers (and the inversion) walk with, for `cond` (one row per
    /// image of `x`): the decoder's at guidance scale 1, else guided against the fully
    /// unconditional row. `what` names the caller in errors.
    fn model<'b>(
        &'b self,
        cond: &'b DecoderCondition,
        null_text: &TextCondition,
        guidance_scale: f64,
        x: &Tensor,
        what: &str,
    ) -> Result<Model<'b>> {
        ensure!(
            guidance_scale.is_finite() && guidance_scale >= 0.0,
            "guidance scale must be finite and >= 0, got {guidance_scale}"
        );
        let (b, channels) = (x.size()[0], x.size()[1]);
        ensure!(
            cond.len() == b,
            "{what}: {} conditioning rows for {b} images",
            cond.len()
        );
        let d = self.decoder;
        if guidance_scale == 1.0 {
            return Ok(Box::new(move |x: &Tensor, t: &Tensor| {
                d.forward_t(x, t, cond, false)
            }));
        }
        let both = cond.cat(&d.null_condition(null_text, b)?)?;
        let mut guided = classifier_free_guidance(
            move |x: &Tensor, t: &Tensor| d.forward_t(x, t, &both, false),
            guidance_scale,
            channels,
        );
        Ok(Box::new(move |x: &Tensor, t: &Tensor| Ok(guided(x, t)?)))
    }

    /// Walks the process from `x` at step `start` with `model(network input, t)`; a
    /// self-conditioned decoder gets the (guided, clipped) x_0 of the step before as its estimate.
    fn run<M>(&self, x: Tensor, start: usize, mut model: M) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        let (kind, clip) = (self.kind, &self.clip);
        Ok(if self.decoder.self_condition {
            let conditioned = self_conditioned(&self.training, self.clip, |x, x0, t| {
                model(&self.decoder.input(x, x0)?, t)
            });
            self.diffusion
                .sample_from(kind, clip, x, start, conditioned, None)?
        } else {
            self.diffusion
                .sample_from(kind, clip, x, start, model, None)?
        })
    }
}
