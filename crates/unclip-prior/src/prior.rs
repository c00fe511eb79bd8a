//! Either prior behind one interface: built from the `prior:` section, fitted to training
//! embeddings, sampled with guidance and reranked candidates.

use anyhow::{bail, Result};
use tch::{nn, Tensor};
use unclip_diffusion::SamplerConfig;

use crate::autoregressive::{ArSampling, AutoregressivePrior};
use crate::model::{DiffusionPrior, TextCondition};
use crate::sample::{PriorSampler, PriorSamples};
use crate::task::{PriorKind, PriorSection};

/// How a prior samples: the diffusion prior's process, or the autoregressive prior's temperature
/// and z_i · z_t band.
#[derive(Debug, Clone, PartialEq)]
pub enum PriorSampling {
    Diffusion(SamplerConfig),
    Autoregressive(ArSampling),
}

impl PriorSampling {
    /// These settings with the keys of the YAML mapping `yaml` replaced (its kind's keys only;
    /// errors name `option` and the key).
    pub fn with_keys(&self, option: &str, yaml: &str) -> Result<Self> {
        use unclip_train::config::with_keys;
        Ok(match self {
            Self::Diffusion(s) => Self::Diffusion(with_keys(option, s, yaml)?),
            Self::Autoregressive(s) => Self::Autoregressive(with_keys(option, s, yaml)?),
        })
    }
}

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

    /// The sampling settings of its config (`prior.sampling`, or the autoregressive prior's own).
    pub fn sampling(&self, section: &PriorSection) -> PriorSampling {
        match self {
            Self::Diffusion(_) => PriorSampling::Diffusion(section.sampling.clone()),
            Self::Autoregressive(m) => PriorSampling::Autoregressive(m.cfg.sampling()),
        }
    }

    /// Image embeddings for `text`, sampled as `sampling` says (which must be this prior's kind).
    pub fn sample(
        &self,
        section: &PriorSection,
        sampling: &PriorSampling,
        text: &TextCondition,
        null: &TextCondition,
        guidance_scale: f64,
        candidates: usize,
    ) -> Result<PriorSamples> {
        match (self, sampling) {
            (Self::Diffusion(m), PriorSampling::Diffusion(s)) => PriorSampler::new(
                m,
                &section.diffusion,
                s,
            )?
            .sample(text, null, guidance_scale, candidates),
            (Self::Autoregressive(m), PriorSampling::Autoregressive(s)) => {
                m.sample(text, null, guidance_scale, candidates, s)
            }
            _ => bail!("the sampling settings are for the other kind of prior"),
        }
    }
}

/// How a prior samples with `sampling`, for messages.
pub fn describe_sampling(sampling: &PriorSampling) -> String {
    match sampling {
        PriorSampling::Diffusion(s) => s.describe(),
        PriorSampling::Autoregressive(s) => format!(
            "autoregressive, temperature {}, z_i · z_t band {}",
            s.temperature,
            s.dot_quantile
                .map_or("drawn from the model".to_string(), |q| format!(
                    "at quantile {q}"
                ))
        ),
    }
}
