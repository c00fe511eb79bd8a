//! Either prior behind one interface: built from the `prior:` section, fitted to training
//! embeddings, sampled with guidance and reranked candidates.

use anyhow::Result;
use tch::{nn, Tensor};
use unclip_diffusion::{Respacing, SamplerConfig};

use crate::autoregressive::AutoregressivePrior;
use crate::model::{DiffusionPrior, TextCondition};
use crate::sample::{PriorSampler, PriorSamples};
use crate::task::{PriorKind, PriorSection};

#[derive(Debug)]
pub enum Prior {
    Diffusion(DiffusionPrior),
    Autoregressive(AutoregressivePrior),
}

impl Prior {
    /// The section's kind of prior under `p` (the root, for diffusers' names).
    pub fn new(p: nn::Path, section: &PriorSection) -> Result<Self> {
        Ok(match section.kind {
            PriorKind::Diffusion => {
                Self::Diffusion(DiffusionPrior::new(p, section.diffusion_model()?)?)
            }
            PriorKind::Autoregressive => Self::Autoregressive(AutoregressivePrior::new(
                p,
                section.autoregressive_model()?,
            )?),
        })
    }

    /// What is computed from training pairs [N, D] before training: the diffusion prior's
    /// standardisation, the autoregressive prior's PCA and quantiles.
    pub fn fit(&mut self, z_i: &Tensor, z_t: &Tensor) -> Result<()> {
        match self {
            Self::Diffusion(m) => m.set_clip_stats(z_i),
            Self::Autoregressive(m) => m.codec.fit(z_i, z_t),
        }
    }

    /// Image embeddings for `text`; `sampling` is the diffusion prior's process (the
    /// autoregressive prior samples as `prior.autoregressive` says).
    pub fn sample(
        &self,
        section: &PriorSection,
        sampling: &SamplerConfig,
        text: &TextCondition,
        null: &TextCondition,
        guidance_scale: f64,
        candidates: usize,
    ) -> Result<PriorSamples> {
        match self {
            Self::Diffusion(m) => PriorSampler::new(m, &section.diffusion, sampling)?.sample(
                text,
                null,
                guidance_scale,
                candidates,
            ),
            Self::Autoregressive(m) => m.sample(text, null, guidance_scale, candidates),
        }
    }

    /// How it samples, for messages: the sampler and steps of `sampling`, or the autoregressive
    /// prior's temperature and z_i · z_t band.
    pub fn describe_sampling(&self, sampling: &SamplerConfig) -> String {
        match self {
            Self::Diffusion(_) => match &sampling.steps {
                Respacing::Spec(spec) => format!("{:?} {spec}", sampling.sampler),
                Respacing::Explicit(v) => format!("{:?} {} steps", sampling.sampler, v.len()),
            },
            Self::Autoregressive(m) => format!(
                "autoregressive, temperature {}, z_i · z_t band {}",
                m.cfg.temperature,
                m.cfg
                    .dot_quantile
                    .map_or("drawn from the model".to_string(), |q| format!(
                        "at quantile {q}"
                    ))
            ),
        }
    }
}
