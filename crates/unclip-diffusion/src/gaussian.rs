//! Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021, improved DDPM), laid out as
//! guided-diffusion's `GaussianDiffusion`: one object holds every schedule-derived array and every
//! method takes a batch of timesteps `t` of shape [B] and gathers from them.

use crate::error::{shape_err, DiffusionError, Result};
use crate::schedule::{alphas_cumprod, respaced_betas, BetaSchedule, Respacing};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// What the network's mean channels predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MeanType {
    /// The added noise ε.
    #[default]
    Epsilon,
    /// The clean sample x_0 (the unCLIP diffusion prior).
    X0,
    /// v = √ᾱ·ε − √(1−ᾱ)·x_0 (Salimans & Ho 2022).
    V,
}

/// How the reverse-process variance is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance β̃_t (log clipped at the first step).
    #[default]
    FixedSmall,
    /// β_t (with β̃_1 at the first step, as guided-diffusion).
    FixedLarge,
    /// The network outputs v ∈ [-1, 1] per channel; log σ² = frac·log β_t + (1−frac)·log β̃_t
    /// with frac = (v + 1)/2. The output then has twice the input's channels.
    LearnedRange,
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// MSE between the mean output and its target (ε, x_0 or v): L_simple.
    #[default]
    Mse,
    /// L_simple + λ·L_vlb (improved DDPM); needs `learned_range` variance.
    Hybrid,
}

/// The `diffusion:` section of a model config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    pub schedule: BetaSchedule,
    pub timesteps: usize,
    pub predict: MeanType,
    pub variance: VarianceType,
    pub loss: LossType,
    /// λ of the hybrid loss. L_vlb is estimated as T · L_t for a uniform t, so the VLB term added
    /// is λ·T·L_t (equal to guided-diffusion's rescaled hybrid, which multiplies L_t by T/1000).
    pub vlb_weight: f64,
    /// Optional weight per training timestep, multiplied into each sample's loss.
    pub timestep_loss_weights: Option<Vec<f64>>,
    /// A smooth alternative to `timestep_loss_weights`: more weight on the middle noise levels.
    pub timestep_emphasis: Option<TimestepEmphasis>,
    /// Min-SNR-γ (Hang et al. 2023): weights L_simple so that, in x_0 terms, timestep t counts
    /// min(SNR(t), γ) — ε: min(SNR, γ)/SNR, v: min(SNR, γ)/(SNR + 1), x_0: min(SNR, γ). Caps the
    /// nearly noise-free steps, whose gradients otherwise dominate. L_vlb is left unweighted.
    pub min_snr_gamma: Option<f64>,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            schedule: BetaSchedule::Cosine,
            timesteps: 1000,
            predict: MeanType::Epsilon,
            variance: VarianceType::FixedSmall,
            loss: LossType::Mse,
            vlb_weight: 1e-3,
            timestep_loss_weights: None,
            timestep_emphasis: None,
            min_snr_gamma: None,
        }
    }
}

/// Per-timestep loss weights `floor + (1 - floor) · exp(-½ ((t/T - centre) / width)²)`, scaled to
/// mean 1 over the T steps (so the loss and learning rate keep their scale). Unlike Min-SNR or P2,
/// which take the noisiest steps' weight to zero (and with it the background colour, decided
/// there), the floor keeps every step trained; the bump trains the middle noise levels where a
/// sample's layout and outlines are decided.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestepEmphasis {
    /// Where the weight peaks, as a fraction of T.
    pub centre: f64,
    /// The bump's standard deviation, as a fraction of T.
    pub width: f64,
    /// The weight far from the centre relative to the peak, in [0, 1]; 1 is uniform.
    pub floor: f64,
}

impl TimestepEmphasis {
    /// The T weights, mean 1.
    pub fn weights(&self, timesteps: usize) -> Vec<f64> {
        let t_max = timesteps as f64;
        let raw: Vec<f64> = (0..timesteps)
            .map(|t| {
                let z = (t as f64 / t_max - self.centre) / self.width;
                self.floor + (1.0 - self.floor) * (-0.5 * z * z).exp()
            })
            .collect();
        let mean = raw.iter().sum::<f64>() / t_max;
        raw.into_iter().map(|w| w / mean).collect()
    }
}

impl DiffusionConfig {
    /// Checks the combination of options; called by [`GaussianDiffusion::new`].
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DiffusionError::InvalidConfig(m));
        if self.timesteps == 0 {
            return bad("diffusion.timesteps must be at least 1".into());
        }
        match (self.loss, self.variance) {
            (LossType::Mse, VarianceType::LearnedRange) => {
                return bad(
                    "diffusion.variance `learned_range` needs diffusion.loss `hybrid`: \
                            the variance is learned only through L_vlb"
                        .into(),
                )
            }
            (LossType::Hybrid, v) if v != VarianceType::LearnedRange => {
                return bad(format!(
                "diffusion.loss `hybrid` needs diffusion.variance `learned_range` (got `{v:?}`): \
                     with a fixed variance and a stop-gradient mean the VLB term trains nothing"
            ))
            }
            _ => {}
        }
        if !(self.vlb_weight.is_finite() && self.vlb_weight >= 0.0) {
            return bad(format!(
                "diffusion.vlb_weight must be finite and >= 0, got {}",
                self.vlb_weight
            ));
        }
        if let Some(w) = &self.timestep_loss_weights {
            if w.len() != self.timesteps {
                return bad(format!(
                    "diffusion.timestep_loss_weights has {} entries, expected diffusion.timesteps = {}",
                    w.len(),
                    self.timesteps
                ));
            }
            if w.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return bad("diffusion.timestep_loss_weights must be finite and >= 0".into());
            }
        }
        if let Some(e) = &self.timestep_emphasis {
            if self.timestep_loss_weights.is_some() {
                return bad(
                    "diffusion.timestep_emphasis and diffusion.timestep_loss_weights both set: \
                     give one"
                        .into(),
                );
            }
            for (key, v) in [("centre", e.centre), ("floor", e.floor)] {
                if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                    return bad(format!(
                        "diffusion.timestep_emphasis.{key} must be in [0, 1], got {v}"
                    ));
                }
            }
            // Narrower than a step, the bump would miss every step (or all but one).
            let step = 1.0 / self.timesteps as f64;
            if !(e.width.is_finite() && e.width >= step) {
                return bad(format!(
                    "diffusion.timestep_emphasis.width must be at least 1/T = {step}, got {}",
                    e.width
                ));
            }
        }
        if let Some(g) = self.min_snr_gamma {
            if !(g.is_finite() && g > 0.0) {
                return bad(format!(
                    "diffusion.min_snr_gamma must be finite and > 0, got {g}"
                ));
            }
        }
        Ok(())
    }
}

/// Clipping applied to every x_0 prediction while sampling. In YAML: `none`, `{static: 1.0}` or
/// `{dynamic: {percentile: 0.995, max_value: 2.0}}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(try_from = "ClipRepr", into = "ClipRepr")]
pub enum ClipDenoised {
    /// Leave x_0 as predicted (embeddings, inversion).
    #[default]
    None,
    /// Clamp to [-r, r] (r = 1 for images in [-1, 1]).
    Static(f64),
    /// Imagen's dynamic thresholding: s = the `percentile` quantile of |x_0| per sample, clamped
    /// to [1, max_value]; x_0 ← clamp(x_0, −s, s) / s.
    Dynamic {
        percentile: f64,
        max_value: Option<f64>,
    },
}

/// The YAML shape of [`ClipDenoised`] (serde_yaml would otherwise want `!static` tags).
#[derive(Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "clip: none, {static: R} or {dynamic: {percentile: P, max_value: M}}"
)]
enum ClipRepr {
    Name(String),
    Static {
        #[serde(rename = "static")]
        range: f64,
    },
    Dynamic {
        dynamic: DynamicRepr,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DynamicRepr {
    percentile: f64,
    #[serde(default)]
    max_value: Option<f64>,
}

impl TryFrom<ClipRepr> for ClipDenoised {
    type Error = String;
    fn try_from(r: ClipRepr) -> std::result::Result<Self, String> {
        Ok(match r {
            ClipRepr::Name(n) if n == "none" => Self::None,
            ClipRepr::Name(n) => {
                return Err(format!(
                    "unknown clip `{n}`: use none, {{static: R}} or {{dynamic: ...}}"
                ))
            }
            ClipRepr::Static { range } => Self::Static(range),
            ClipRepr::Dynamic { dynamic } => Self::Dynamic {
                percentile: dynamic.percentile,
                max_value: dynamic.max_value,
            },
        })
    }
}

impl From<ClipDenoised> for ClipRepr {
    fn from(c: ClipDenoised) -> Self {
        match c {
            ClipDenoised::None => Self::Name("none".into()),
            ClipDenoised::Static(range) => Self::Static { range },
            ClipDenoised::Dynamic {
                percentile,
                max_value,
            } => Self::Dynamic {
                dynamic: DynamicRepr {
                    percentile,
                    max_value,
                },
            },
        }
    }
}

impl ClipDenoised {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Static(r) if !(r.is_finite() && r > 0.0) => Err(DiffusionError::InvalidConfig(
                format!("static clip range must be positive, got {r}"),
            )),
            Self::Dynamic { percentile, max_value }
                if !(percentile > 0.0 && percentile <= 1.0)
                    || max_value.is_some_and(|m| m.is_nan() || m < 1.0) =>
            {
                Err(DiffusionError::InvalidConfig(format!(
                    "dynamic thresholding needs 0 < percentile <= 1 and max_value >= 1, got {percentile} and {max_value:?}"
                )))
            }
            _ => Ok(()),
        }
    }

    pub fn apply(&self, x0: &Tensor) -> Result<Tensor> {
        Ok(match *self {
            Self::None => x0.shallow_clone(),
            Self::Static(r) => x0.f_clamp(-r, r)?,
            Self::Dynamic {
                percentile,
                max_value,
            } => {
                let b = x0.size()[0];
                // quantile needs f32/f64 and a q of the same kind.
                let kind = if x0.kind() == Kind::Double {
                    Kind::Double
                } else {
                    Kind::Float
                };
                let flat = x0.f_reshape([b, -1])?.f_abs()?.f_to_kind(kind)?;
                let q = Tensor::from(percentile)
                    .to_kind(kind)
                    .to_device(x0.device());
                let s = flat.f_quantile(&q, 1, false, "linear")?;
                let s = match max_value {
                    Some(m) => s.f_clamp(1.0, m)?,
                    None => s.f_clamp_min(1.0)?,
                };
                let s = broadcast_to(&s.f_to_kind(x0.kind())?, x0.dim())?;
                x0.f_clamp_tensor(Some(&(-&s)), Some(&s))?.f_div(&s)?
            }
        })
    }
}

/// p(x_{t-1} | x_t) as predicted by the network.
#[derive(Debug)]
pub struct PMeanVariance {
    pub mean: Tensor,
    pub variance: Tensor,
    pub log_variance: Tensor,
    pub pred_xstart: Tensor,
    pub pred_eps: Tensor,
}

/// Per-sample training losses, each of shape [B].
#[derive(Debug)]
pub struct TrainingLosses {
    /// What to minimise (mean it over the batch).
    pub loss: Tensor,
    /// MSE of the mean output against its target.
    pub mse: Tensor,
    /// The VLB term L_t in bits/dim (hybrid loss only), before weighting.
    pub vb: Option<Tensor>,
}

/// Schedule-derived arrays of one diffusion process, full or respaced.
#[derive(Debug)]
pub struct GaussianDiffusion {
    pub mean_type: MeanType,
    pub var_type: VarianceType,
    pub loss_type: LossType,
    pub vlb_weight: f64,
    /// Original (training) timestep of each step of this process; the model sees these.
    timestep_map: Vec<i64>,
    /// Number of timesteps of the process the model was trained on.
    original_num_timesteps: usize,
    betas_f64: Vec<f64>,
    alphas_cumprod_f64: Vec<f64>,
    device: Device,
    betas: Tensor,
    log_betas: Tensor,
    alphas_cumprod: Tensor,
    alphas_cumprod_prev: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    sqrt_recip_alphas_cumprod: Tensor,
    sqrt_recipm1_alphas_cumprod: Tensor,
    posterior_variance: Tensor,
    posterior_log_variance_clipped: Tensor,
    posterior_mean_coef1: Tensor,
    posterior_mean_coef2: Tensor,
    fixed_large_variance: Tensor,
    loss_weights: Option<Tensor>,
    mse_weights: Option<Tensor>,
}

fn f64_tensor(v: &[f64]) -> Tensor {
    Tensor::from_slice(v)
}

/// Reshape a [B] tensor to [B, 1, ...] with `ndim` dimensions in all.
pub(crate) fn broadcast_to(v: &Tensor, ndim: usize) -> Result<Tensor> {
    let mut shape = vec![v.size()[0]];
    shape.resize(ndim.max(1), 1);
    Ok(v.f_reshape(shape.as_slice())?)
}

impl GaussianDiffusion {
    /// The full training process described by `config`.
    pub fn new(config: &DiffusionConfig) -> Result<Self> {
        config.validate()?;
        let betas = config.schedule.betas(config.timesteps)?;
        let map: Vec<i64> = (0..config.timesteps as i64).collect();
        Self::from_betas(config, betas, map, config.timesteps)
    }

    /// The process visiting only the steps `respacing` keeps (for sampling), with betas
    /// recomputed from the kept alphas_cumprod. The model is still called with original timesteps.
    pub fn respaced(config: &DiffusionConfig, respacing: &Respacing) -> Result<Self> {
        config.validate()?;
        let betas = config.schedule.betas(config.timesteps)?;
        let kept = respacing.timesteps(config.timesteps)?;
        let new_betas = respaced_betas(&alphas_cumprod(&betas), &kept);
        let map = kept.iter().map(|&t| t as i64).collect();
        Self::from_betas(config, new_betas, map, config.timesteps)
    }

    fn from_betas(
        config: &DiffusionConfig,
        betas: Vec<f64>,
        timestep_map: Vec<i64>,
        original_num_timesteps: usize,
    ) -> Result<Self> {
        let n = betas.len();
        if let Some(&bad) = betas.iter().find(|b| !(**b > 0.0 && **b <= 1.0)) {
            return Err(DiffusionError::InvalidConfig(format!(
                "beta {bad} is outside (0, 1]"
            )));
        }
        let ac = alphas_cumprod(&betas);
        let mut ac_prev = vec![1.0];
        ac_prev.extend_from_slice(&ac[..n - 1]);
        let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
        let posterior_variance = map(&|i| betas[i] * (1.0 - ac_prev[i]) / (1.0 - ac[i]));
        // β̃_0 = 0, so its log is clipped to β̃_1 (guided-diffusion); a 1-step process uses β_0.
        let pv1 = if n > 1 {
            posterior_variance[1]
        } else {
            betas[0]
        };
        let posterior_log_variance_clipped = map(&|i| {
            if i == 0 {
                pv1.ln()
            } else {
                posterior_variance[i].ln()
            }
        });
        let fixed_large = map(&|i| if i == 0 { pv1 } else { betas[i] });
        let emphasis = config
            .timestep_emphasis
            .map(|e| e.weights(original_num_timesteps));
        let loss_weights = config
            .timestep_loss_weights
            .as_ref()
            .or(emphasis.as_ref())
            .map(|w| {
                let per_step: Vec<f64> = timestep_map.iter().map(|&t| w[t as usize]).collect();
                f64_tensor(&per_step)
            });
        let mse_weights = config.min_snr_gamma.map(|gamma| {
            f64_tensor(&map(&|i| {
                let snr = ac[i] / (1.0 - ac[i]);
                let capped = snr.min(gamma);
                match config.predict {
                    MeanType::Epsilon => capped / snr,
                    MeanType::V => capped / (snr + 1.0),
                    MeanType::X0 => capped,
                }
            }))
        });
        Ok(Self {
            mean_type: config.predict,
            var_type: config.variance,
            loss_type: config.loss,
            vlb_weight: config.vlb_weight,
            original_num_timesteps,
            device: Device::Cpu,
            betas: f64_tensor(&betas),
            log_betas: f64_tensor(&map(&|i| betas[i].ln())),
            alphas_cumprod: f64_tensor(&ac),
            alphas_cumprod_prev: f64_tensor(&ac_prev),
            sqrt_alphas_cumprod: f64_tensor(&map(&|i| ac[i].sqrt())),
            sqrt_one_minus_alphas_cumprod: f64_tensor(&map(&|i| (1.0 - ac[i]).sqrt())),
            sqrt_recip_alphas_cumprod: f64_tensor(&map(&|i| (1.0 / ac[i]).sqrt())),
            sqrt_recipm1_alphas_cumprod: f64_tensor(&map(&|i| (1.0 / ac[i] - 1.0).sqrt())),
            posterior_variance: f64_tensor(&posterior_variance),
            posterior_log_variance_clipped: f64_tensor(&posterior_log_variance_clipped),
            posterior_mean_coef1: f64_tensor(&map(&|i| {
                betas[i] * ac_prev[i].sqrt() / (1.0 - ac[i])
            })),
            posterior_mean_coef2: f64_tensor(&map(&|i| {
                (1.0 - ac_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i])
            })),
            fixed_large_variance: f64_tensor(&fixed_large),
            loss_weights,
            mse_weights,
            betas_f64: betas,
            alphas_cumprod_f64: ac,
            timestep_map,
        })
    }

    /// Moves the schedule arrays to `device` (they are gathered there on every call).
    pub fn to_device(mut self, device: Device) -> Self {
        self.device = device;
        for t in [
            &mut self.betas,
            &mut self.log_betas,
            &mut self.alphas_cumprod,
            &mut self.alphas_cumprod_prev,
            &mut self.sqrt_alphas_cumprod,
            &mut self.sqrt_one_minus_alphas_cumprod,
            &mut self.sqrt_recip_alphas_cumprod,
            &mut self.sqrt_recipm1_alphas_cumprod,
            &mut self.posterior_variance,
            &mut self.posterior_log_variance_clipped,
            &mut self.posterior_mean_coef1,
            &mut self.posterior_mean_coef2,
            &mut self.fixed_large_variance,
        ] {
            *t = t.to_device(device);
        }
        self.loss_weights = self.loss_weights.map(|w| w.to_device(device));
        self.mse_weights = self.mse_weights.map(|w| w.to_device(device));
        self
    }

    /// Number of steps of this process (the respaced count for a respaced one).
    pub fn num_timesteps(&self) -> usize {
        self.betas_f64.len()
    }

    pub fn original_num_timesteps(&self) -> usize {
        self.original_num_timesteps
    }

    pub fn betas(&self) -> &[f64] {
        &self.betas_f64
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod_f64
    }

    /// The original training timestep of each step of this process.
    pub fn timestep_map(&self) -> &[i64] {
        &self.timestep_map
    }

    /// Maps steps of this process to the training timesteps the model was conditioned on.
    pub fn model_timesteps(&self, t: &Tensor) -> Result<Tensor> {
        let map = Tensor::from_slice(&self.timestep_map).to_device(t.device());
        Ok(map.f_index_select(0, t)?)
    }

    /// Uniformly random timesteps for a training batch.
    pub fn sample_timesteps(&self, batch: i64, device: Device) -> Tensor {
        Tensor::randint(self.num_timesteps() as i64, [batch], (Kind::Int64, device))
    }

    /// Checks that `t` is an integer [B] tensor within range, B matching `x`.
    pub fn check_timesteps(&self, t: &Tensor, x: &Tensor) -> Result<()> {
        let b = x.size().first().copied().unwrap_or(0);
        if t.dim() != 1 || t.size()[0] != b {
            return Err(shape_err(
                "timesteps",
                format!(
                    "t must have shape [B] = [{b}] to match x {:?}, got {:?}",
                    x.size(),
                    t.size()
                ),
            ));
        }
        if t.kind() != Kind::Int64 {
            return Err(shape_err(
                "timesteps",
                format!("t must be int64, got {:?}", t.kind()),
            ));
        }
        if b > 0 {
            let (lo, hi) = (t.f_min()?.int64_value(&[]), t.f_max()?.int64_value(&[]));
            let n = self.num_timesteps();
            for value in [lo, hi] {
                if value < 0 || value >= n as i64 {
                    return Err(DiffusionError::TimestepOutOfRange {
                        value,
                        num_timesteps: n,
                    });
                }
            }
        }
        Ok(())
    }

    /// Gathers `arr[t]` shaped [B, 1, ...] to broadcast against `like`, in its kind and device.
    fn extract(&self, arr: &Tensor, t: &Tensor, like: &Tensor) -> Result<Tensor> {
        let v = arr.f_index_select(0, &t.f_to_device(arr.device())?)?;
        let v = v.f_to_device(like.device())?.f_to_kind(like.kind())?;
        broadcast_to(&v, like.dim())
    }

    fn check_same_shape(context: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.size() != b.size() {
            return Err(shape_err(
                context,
                format!("{:?} vs {:?}", a.size(), b.size()),
            ));
        }
        Ok(())
    }

    /// Mean, variance and log-variance of q(x_t | x_0).
    pub fn q_mean_variance(
        &self,
        x_start: &Tensor,
        t: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.check_timesteps(t, x_start)?;
        let mean = self.extract(&self.sqrt_alphas_cumprod, t, x_start)? * x_start;
        let one_minus = self
            .extract(&self.alphas_cumprod, t, x_start)?
            .f_rsub_scalar(1.0)?;
        let log_var = one_minus.f_log()?;
        Ok((
            mean,
            one_minus.expand_as(x_start),
            log_var.expand_as(x_start),
        ))
    }

    /// Draws x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) with the given noise.
    pub fn q_sample(&self, x_start: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.check_timesteps(t, x_start)?;
        Self::check_same_shape("q_sample noise", x_start, noise)?;
        Ok(
            self.extract(&self.sqrt_alphas_cumprod, t, x_start)? * x_start
                + self.extract(&self.sqrt_one_minus_alphas_cumprod, t, x_start)? * noise,
        )
    }

    /// Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0).
    pub fn q_posterior_mean_variance(
        &self,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.check_timesteps(t, x_t)?;
        Self::check_same_shape("q_posterior x_start vs x_t", x_start, x_t)?;
        self.posterior(x_start, x_t, t)
    }

    /// [`Self::q_posterior_mean_variance`] for callers that checked `t` already: the check
    /// synchronises with the device, so the hot path makes it once.
    fn posterior(
        &self,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mean = self.extract(&self.posterior_mean_coef1, t, x_t)? * x_start
            + self.extract(&self.posterior_mean_coef2, t, x_t)? * x_t;
        let var = self
            .extract(&self.posterior_variance, t, x_t)?
            .expand_as(x_t);
        let log_var = self
            .extract(&self.posterior_log_variance_clipped, t, x_t)?
            .expand_as(x_t);
        Ok((mean, var, log_var))
    }

    /// x_0 implied by ε at x_t.
    pub fn predict_xstart_from_eps(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        eps: &Tensor,
    ) -> Result<Tensor> {
        Ok(self.extract(&self.sqrt_recip_alphas_cumprod, t, x_t)? * x_t
            - self.extract(&self.sqrt_recipm1_alphas_cumprod, t, x_t)? * eps)
    }

    /// ε implied by x_0 at x_t.
    pub fn predict_eps_from_xstart(&self, x_t: &Tensor, t: &Tensor, x0: &Tensor) -> Result<Tensor> {
        Ok(
            (self.extract(&self.sqrt_recip_alphas_cumprod, t, x_t)? * x_t - x0)
                / self.extract(&self.sqrt_recipm1_alphas_cumprod, t, x_t)?,
        )
    }

    /// The v target of x_0 and ε at t.
    pub fn v_target(&self, x_start: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
        Ok(self.extract(&self.sqrt_alphas_cumprod, t, x_start)? * noise
            - self.extract(&self.sqrt_one_minus_alphas_cumprod, t, x_start)? * x_start)
    }

    /// Splits a raw network output into its mean part and (for learned variance) its variance part.
    pub fn split_output(
        &self,
        model_output: &Tensor,
        x: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (out, xs) = (model_output.size(), x.size());
        match self.var_type {
            VarianceType::LearnedRange => {
                let mut want = xs.clone();
                if want.len() < 2 {
                    return Err(shape_err(
                        "model output",
                        "learned variance needs a channel dim",
                    ));
                }
                want[1] *= 2;
                if out != want {
                    return Err(shape_err(
                        "model output",
                        format!(
                            "learned_range variance needs {want:?} (2× x's channels), got {out:?}"
                        ),
                    ));
                }
                let parts = model_output.f_split(xs[1], 1)?;
                Ok((parts[0].shallow_clone(), Some(parts[1].shallow_clone())))
            }
            _ => {
                if out != xs {
                    return Err(shape_err(
                        "model output",
                        format!("expected {xs:?}, got {out:?}"),
                    ));
                }
                Ok((model_output.shallow_clone(), None))
            }
        }
    }

    /// x_0 and ε predicted by the mean part of the output (before any clipping).
    pub fn predict_xstart_eps(
        &self,
        mean_out: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        Ok(match self.mean_type {
            MeanType::Epsilon => (
                self.predict_xstart_from_eps(x_t, t, mean_out)?,
                mean_out.shallow_clone(),
            ),
            MeanType::X0 => (
                mean_out.shallow_clone(),
                self.predict_eps_from_xstart(x_t, t, mean_out)?,
            ),
            MeanType::V => {
                let a = self.extract(&self.sqrt_alphas_cumprod, t, x_t)?;
                let s = self.extract(&self.sqrt_one_minus_alphas_cumprod, t, x_t)?;
                (&a * x_t - &s * mean_out, a * mean_out + s * x_t)
            }
        })
    }

    /// Log-variance of p(x_{t-1} | x_t) for the configured variance type.
    fn model_log_variance(
        &self,
        var_out: Option<&Tensor>,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        Ok(match (self.var_type, var_out) {
            (VarianceType::FixedSmall, _) => self
                .extract(&self.posterior_log_variance_clipped, t, x_t)?
                .expand_as(x_t),
            (VarianceType::FixedLarge, _) => self
                .extract(&self.fixed_large_variance, t, x_t)?
                .f_log()?
                .expand_as(x_t),
            (VarianceType::LearnedRange, Some(v)) => {
                let min_log = self.extract(&self.posterior_log_variance_clipped, t, x_t)?;
                let max_log = self.extract(&self.log_betas, t, x_t)?;
                let frac = (v + 1.0) / 2.0;
                &frac * max_log + frac.rsub_scalar(1.0) * min_log
            }
            (VarianceType::LearnedRange, None) => {
                return Err(shape_err(
                    "model output",
                    "learned_range needs variance channels",
                ))
            }
        })
    }

    /// p(x_{t-1} | x_t) from a raw network output (guided-diffusion `p_mean_variance`).
    pub fn p_mean_variance(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        clip: &ClipDenoised,
    ) -> Result<PMeanVariance> {
        self.check_timesteps(t, x_t)?;
        self.p_mean_variance_checked(model_output, x_t, t, clip)
    }

    fn p_mean_variance_checked(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        clip: &ClipDenoised,
    ) -> Result<PMeanVariance> {
        let (mean_out, var_out) = self.split_output(model_output, x_t)?;
        let log_variance = self.model_log_variance(var_out.as_ref(), x_t, t)?;
        let (x0, eps) = self.predict_xstart_eps(&mean_out, x_t, t)?;
        let pred_xstart = clip.apply(&x0)?;
        let pred_eps = if matches!(clip, ClipDenoised::None) {
            eps
        } else {
            self.predict_eps_from_xstart(x_t, t, &pred_xstart)?
        };
        let (mean, _, _) = self.posterior(&pred_xstart, x_t, t)?;
        Ok(PMeanVariance {
            mean,
            variance: log_variance.exp(),
            log_variance,
            pred_xstart,
            pred_eps,
        })
    }

    /// Per-sample losses for one training batch: `x_t = q_sample(x_start, t, noise)` and the
    /// network's raw output at (x_t, t).
    pub fn training_losses(
        &self,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        noise: &Tensor,
    ) -> Result<TrainingLosses> {
        self.check_timesteps(t, x_start)?;
        Self::check_same_shape("training_losses x_start vs x_t", x_start, x_t)?;
        Self::check_same_shape("training_losses x_start vs noise", x_start, noise)?;
        let (mean_out, var_out) = self.split_output(model_output, x_t)?;
        let target = match self.mean_type {
            MeanType::Epsilon => noise.shallow_clone(),
            MeanType::X0 => x_start.shallow_clone(),
            MeanType::V => self.v_target(x_start, t, noise)?,
        };
        let mse = mean_flat(&(&mean_out - target).f_square()?)?;
        let simple = match &self.mse_weights {
            Some(w) => &mse * self.extract(w, t, &mse)?,
            None => mse.shallow_clone(),
        };
        let (mut loss, vb) = match (self.loss_type, var_out) {
            (LossType::Hybrid, Some(var_out)) => {
                // The VLB trains only the variance: stop the gradient through the mean.
                let frozen = Tensor::f_cat(&[mean_out.detach(), var_out], 1)?;
                let vb = self.vb_terms_bpd_checked(&frozen, x_start, x_t, t)?;
                let scale = self.vlb_weight * self.num_timesteps() as f64;
                (&simple + &vb * scale, Some(vb))
            }
            _ => (simple, None),
        };
        if let Some(w) = &self.loss_weights {
            loss *= self.extract(w, t, &mse)?;
        }
        Ok(TrainingLosses { loss, mse, vb })
    }

    /// The VLB term L_t in bits/dim for each sample: KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) for
    /// t > 0 and the discretised Gaussian decoder NLL at t = 0 (images in [-1, 1], 256 levels).
    pub fn vb_terms_bpd(
        &self,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        self.check_timesteps(t, x_t)?;
        Self::check_same_shape("vb_terms_bpd x_start vs x_t", x_start, x_t)?;
        self.vb_terms_bpd_checked(model_output, x_start, x_t, t)
    }

    fn vb_terms_bpd_checked(
        &self,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        let (true_mean, _, true_log_var) = self.posterior(x_start, x_t, t)?;
        let out = self.p_mean_variance_checked(model_output, x_t, t, &ClipDenoised::None)?;
        let ln2 = std::f64::consts::LN_2;
        let kl = mean_flat(&normal_kl(
            &true_mean,
            &true_log_var,
            &out.mean,
            &out.log_variance,
        ))? / ln2;
        let nll =
            discretized_gaussian_log_likelihood(x_start, &out.mean, &(&out.log_variance * 0.5))?;
        let nll = mean_flat(&(-nll))? / ln2;
        let is_first = t.f_eq(0)?.f_to_device(kl.device())?;
        Ok(nll.f_where_self(&is_first, &kl)?)
    }

    /// KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim: the prior term of the VLB.
    pub fn prior_bpd(&self, x_start: &Tensor) -> Result<Tensor> {
        let b = x_start.size()[0];
        let t = Tensor::full(
            [b],
            self.num_timesteps() as i64 - 1,
            (Kind::Int64, x_start.device()),
        );
        let (mean, _, log_var) = self.q_mean_variance(x_start, &t)?;
        let zeros = mean.zeros_like();
        Ok(mean_flat(&normal_kl(&mean, &log_var, &zeros, &zeros))? / std::f64::consts::LN_2)
    }

    pub(crate) fn gather(&self, which: Coef, t: &Tensor, like: &Tensor) -> Result<Tensor> {
        let arr = match which {
            Coef::AlphasCumprod => &self.alphas_cumprod,
            Coef::AlphasCumprodPrev => &self.alphas_cumprod_prev,
        };
        self.extract(arr, t, like)
    }

    pub fn device(&self) -> Device {
        self.device
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Coef {
    AlphasCumprod,
    AlphasCumprodPrev,
}

/// Mean per-sample loss in each quarter of the timestep range (`loss_q0` … `loss_q3`; quarters
/// with no sample in the batch are left out): what every diffusion trainer logs.
pub fn loss_per_quarter(
    per_sample: &Tensor,
    t: &Tensor,
    num_timesteps: usize,
) -> Result<Vec<(String, f64)>> {
    let quarter = (t * 4).f_divide_scalar_mode(num_timesteps as i64, "floor")?;
    let mut metrics = Vec::new();
    for q in 0..4 {
        let mask = quarter.f_eq(q)?.f_to_device(per_sample.device())?;
        if mask.f_any()?.int64_value(&[]) != 0 {
            let v = per_sample
                .detach()
                .f_masked_select(&mask)?
                .f_mean(Kind::Float)?
                .double_value(&[]);
            metrics.push((format!("loss_q{q}"), v));
        }
    }
    Ok(metrics)
}

/// Mean over every dimension but the batch.
pub fn mean_flat(x: &Tensor) -> Result<Tensor> {
    if x.dim() <= 1 {
        return Ok(x.shallow_clone());
    }
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    Ok(x.f_mean_dim(dims.as_slice(), false, None)?)
}

/// KL divergence between two diagonal Gaussians given by mean and log-variance, elementwise.
pub fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Tensor {
    ((logvar2 - logvar1) - 1.0
        + (logvar1 - logvar2).exp()
        + (mean1 - mean2).square() * (-logvar2).exp())
        * 0.5
}

/// Fast approximation of the standard normal CDF (guided-diffusion, from PixelCNN++).
pub fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    ((x + x.pow_tensor_scalar(3) * 0.044715) * c)
        .tanh()
        .g_add_scalar(1.0)
        * 0.5
}

/// Log-likelihood of `x` (in [-1, 1], 256 levels) under a Gaussian discretised to those levels,
/// with the edge bins extended to ±∞.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Result<Tensor> {
    if x.size() != means.size() || x.size() != log_scales.size() {
        return Err(shape_err(
            "discretized_gaussian_log_likelihood",
            format!(
                "x {:?}, means {:?}, log_scales {:?}",
                x.size(),
                means.size(),
                log_scales.size()
            ),
        ));
    }
    let centered = x - means;
    let inv_stdv = (-log_scales).exp();
    let cdf_plus = approx_standard_normal_cdf(&(&inv_stdv * (&centered + 1.0 / 255.0)));
    let cdf_min = approx_standard_normal_cdf(&(&inv_stdv * (&centered - 1.0 / 255.0)));
    let log_cdf_plus = cdf_plus.clamp_min(1e-12).log();
    let log_one_minus_cdf_min = cdf_min.rsub_scalar(1.0).clamp_min(1e-12).log();
    let log_cdf_delta = (cdf_plus - cdf_min).clamp_min(1e-12).log();
    let upper = log_one_minus_cdf_min.where_self(&x.gt(0.999), &log_cdf_delta);
    Ok(log_cdf_plus.where_self(&x.lt(-0.999), &upper))
}
