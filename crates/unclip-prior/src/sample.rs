//! Sampling image embeddings from the diffusion prior (unCLIP §2.2): a respaced process walked by DDIM,
//! DPM-Solver++ or DDPM from the core, classifier-free guidance against the null caption, and
//! `candidates` draws per caption of which the one with the highest z_i · z_t is kept.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};
use unclip_data::embeddings::ClipEmbeddings;
use unclip_diffusion::embedding::l2_normalize;
use unclip_diffusion::{
    classifier_free_guidance, ClipDenoised, DiffusionConfig, GaussianDiffusion, SamplerConfig,
    SamplerKind,
};

use crate::model::{DiffusionPrior, TextCondition};

/// What a sampling call returns.
#[derive(Debug)]
pub struct PriorSamples {
    /// [B, D]: the kept candidate per caption, L2-normalised or raw as the prior's
    /// `clip_embeddings` says (the layout of its training embeddings).
    pub image_embeds: Tensor,
    /// [B, n, D]: every candidate, as `image_embeds`.
    pub candidates: Tensor,
    /// [B, n]: each candidate's z_i · z_t (both normalised).
    pub scores: Tensor,
}

/// A prior with the respaced process it samples over.
pub struct PriorSampler<'a> {
    prior: &'a DiffusionPrior,
    diffusion: GaussianDiffusion,
    kind: SamplerKind,
    clip: ClipDenoised,
    embeddings: ClipEmbeddings,
}

impl<'a> PriorSampler<'a> {
    /// `diffusion` is the process the prior was trained with; `sampling` picks sampler and steps.
    pub fn new(
        prior: &'a DiffusionPrior,
        diffusion: &DiffusionConfig,
        sampling: &SamplerConfig,
    ) -> Result<Self> {
        let (process, kind) = sampling.build(diffusion)?;
        Ok(Self {
            prior,
            diffusion: process.to_device(prior.clip_stats().0.device()),
            kind,
            clip: sampling.clip,
            embeddings: ClipEmbeddings::Normalized,
        })
    }

    /// Samples in `embeddings`' convention (the prior's `clip_embeddings`): raw ones are left
    /// unnormalised. L2-normalised by default.
    pub fn with_embeddings(mut self, embeddings: ClipEmbeddings) -> Self {
        self.embeddings = embeddings;
        self
    }

    /// Image embeddings for `text` ([B] rows). `null` is the one-row null condition (the empty
    /// caption) guidance contrasts with; `guidance_scale` 1 is unguided. Uses libtorch's global
    /// generator (seed it for reproducible draws).
    pub fn sample(
        &self,
        text: &TextCondition,
        null: &TextCondition,
        guidance_scale: f64,
        candidates: usize,
    ) -> Result<PriorSamples> {
        check_guidance(guidance_scale, null)?;
        let _g = tch::no_grad_guard();
        let (b, n) = (text.len(), candidates as i64);
        let cond = repeat_candidates(text, candidates)?;
        let m = b * n;
        let device = text.text_embeds.device();
        let d = self.prior.cfg.embedding_dim;
        let noise = Tensor::randn([m, d], (Kind::Float, device));
        let x0 = if guidance_scale == 1.0 {
            self.diffusion.sample(
                self.kind,
                &self.clip,
                noise,
                |x: &Tensor, t: &Tensor| self.prior.forward_t(x, t, &cond, false),
                None,
            )?
        } else {
            let both = with_null_rows(&cond, null)?;
            let guided = classifier_free_guidance(
                |x: &Tensor, t: &Tensor| self.prior.forward_t(x, t, &both, false),
                guidance_scale,
                d,
            );
            self.diffusion
                .sample(self.kind, &self.clip, noise, guided, None)?
        };
        let z = self.prior.unstandardize(&x0).to_kind(Kind::Float);
        let z = match self.embeddings {
            ClipEmbeddings::Normalized => l2_normalize(&z)?,
            ClipEmbeddings::Raw => z,
        };
        rerank(&z, &cond.text_embeds, b, n)
    }
}

/// What every guided prior sampler takes: a finite scale >= 0 and a one-row null condition.
pub(crate) fn check_guidance(guidance_scale: f64, null: &TextCondition) -> Result<()> {
    ensure!(
        guidance_scale.is_finite() && guidance_scale >= 0.0,
        "guidance scale must be finite and >= 0, got {guidance_scale}"
    );
    ensure!(null.len() == 1, "the null condition must have one row");
    Ok(())
}

/// Each caption's row `candidates` times, caption-major: the rows [`rerank`] takes.
pub(crate) fn repeat_candidates(text: &TextCondition, candidates: usize) -> Result<TextCondition> {
    ensure!(candidates >= 1, "candidates must be at least 1");
    let device = text.text_embeds.device();
    let rows = Tensor::arange(text.len(), (Kind::Int64, device)).repeat_interleave_self_int(
        candidates as i64,
        0,
        None,
    );
    text.index_select(&rows)
}

/// `cond` followed by as many rows of the one-row `null`: one batch for guidance.
pub(crate) fn with_null_rows(cond: &TextCondition, null: &TextCondition) -> Result<TextCondition> {
    let zeros = Tensor::zeros([cond.len()], (Kind::Int64, cond.text_embeds.device()));
    cond.cat(&null.index_select(&zeros)?)
}

/// `n` candidates per caption (`z` [B·n, D], caption-major, with their captions' `z_t`) → the
/// one with the highest cosine of z_i and z_t per caption (the candidates kept as they are).
pub(crate) fn rerank(z: &Tensor, z_t: &Tensor, b: i64, n: i64) -> Result<PriorSamples> {
    let d = z.size()[1];
    let z = z.to_kind(Kind::Float);
    let z_t = l2_normalize(&z_t.to_kind(Kind::Float))?;
    let scores = (l2_normalize(&z)? * z_t)
        .sum_dim_intlist(-1, false, Kind::Float)
        .view([b, n]);
    let candidates = z.view([b, n, d]);
    let best = scores.argmax(1, false);
    let image_embeds = candidates
        .gather(1, &best.view([b, 1, 1]).expand([b, 1, d], false), false)
        .squeeze_dim(1);
    Ok(PriorSamples {
        image_embeds,
        candidates,
        scores,
    })
}
