//! Either prior behind one interface: built from the `prior:` section, fitted to training
//! embeddings, sampled with guidance and reranked candidates.

use anyhow::{bail, Result};
use tch::{nn, Tensor};
use unclip_clip::metrics::{precision_recall, NEAREST_K};
use unclip_diffusion::embedding::{l2_normalize, mean_cosine};
use unclip_diffusion::SamplerConfig;

use crate::autoregressive::{ArSampling, AutoregressivePrior};
use crate::model::{DiffusionPrior, TextCondition};
use crate::sample::{PriorSampler, PriorSamples};
use crate::task::{EvalReport, EvalRow, EvalSettings, HeldOut, PriorKind, PriorSection};

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
            (Self::Diffusion(m), PriorSampling::Diffusion(s)) => {
                PriorSampler::new(m, &section.diffusion, s)?
                    .with_embeddings(section.clip_embeddings)
                    .sample(text, null, guidance_scale, candidates)
            }
            (Self::Autoregressive(m), PriorSampling::Autoregressive(s)) => {
                m.sample(text, null, guidance_scale, candidates, s)
            }
            _ => bail!("the sampling settings are for the other kind of prior"),
        }
    }

    /// Samples embeddings for `held_out`'s captions at each of `settings`' guidance scales and
    /// compares them with the true image embeddings and with z_t (SPEC.md's prior evaluation).
    pub fn evaluate(
        &self,
        section: &PriorSection,
        settings: &EvalSettings,
        held_out: &HeldOut,
        null: &TextCondition,
    ) -> Result<EvalReport> {
        let _g = tch::no_grad_guard();
        let h = held_out;
        let baseline = mean_cosine(&h.text.text_embeds, &h.image_embeds)?;
        let codec_round_trip = match self {
            Self::Autoregressive(m) => {
                let back = m.codec.decode(&m.codec.encode(&h.image_embeds))?;
                Some(mean_cosine(&back, &h.image_embeds)?)
            }
            Self::Diffusion(_) => None,
        };
        let true_unit = l2_normalize(&h.image_embeds)?;
        let mut rows = Vec::new();
        for &scale in &settings.guidance_scales {
            tch::manual_seed(settings.seed);
            let s = self.sample(
                section,
                &settings.sampling,
                &h.text,
                null,
                scale,
                settings.candidates,
            )?;
            rows.push(EvalRow {
                guidance_scale: scale,
                cos_true: mean_cosine(&s.image_embeds, &h.image_embeds)?,
                cos_text: mean_cosine(&s.image_embeds, &h.text.text_embeds)?,
                manifold: precision_recall(&true_unit, &l2_normalize(&s.image_embeds)?, NEAREST_K)?,
            });
        }
        Ok(EvalReport {
            baseline,
            codec_round_trip,
            rows,
        })
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
