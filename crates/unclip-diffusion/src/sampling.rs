//! Samplers behind one interface: DDPM ancestral (Ho et al. 2020), DDIM with η and its
//! deterministic inversion (Song et al. 2021), and DPM-Solver++(2M) (Lu et al. 2022, as diffusers'
//! `DPMSolverMultistepScheduler` with the midpoint solver). Every sampler calls a closure with
//! (x_t, training timesteps [B]) that returns the raw network output.

use crate::error::{DiffusionError, Result};
use crate::gaussian::{broadcast_to, ClipDenoised, Coef, DiffusionConfig, GaussianDiffusion};
use crate::schedule::Respacing;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Which sampler to run, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerKind {
    /// Ancestral sampling from p(x_{t-1} | x_t) with the model's variance.
    Ddpm,
    /// DDIM; η = 0 is deterministic, η = 1 matches DDPM's fixed-small variance.
    Ddim { eta: f64 },
    /// Second-order multistep DPM-Solver++ on the data prediction (deterministic).
    DpmSolverPp2M,
}

/// Sampler names as written in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SamplerName {
    #[serde(rename = "ddpm")]
    Ddpm,
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "dpmpp_2m")]
    DpmPp2M,
}

/// The `sampling:` section of a config: which sampler, over which steps, with what clipping.
///
/// ```yaml
/// sampler: ddim        # ddpm | ddim | dpmpp_2m
/// steps: ddim27        # "64", "ddim27", "10,15,20" (sections) or a list [0, 250, 999]
/// eta: 0.0             # ddim only
/// clip: {static: 1.0}  # none | {static: R} | {dynamic: {percentile: 0.995, max_value: 2.0}}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    pub sampler: SamplerName,
    pub steps: Respacing,
    #[serde(default)]
    pub eta: Option<f64>,
    #[serde(default)]
    pub clip: ClipDenoised,
}

impl SamplerConfig {
    /// The sampler and its steps, for messages: `Ddim 64`, `Ddpm 3 steps`.
    pub fn describe(&self) -> String {
        match &self.steps {
            Respacing::Spec(spec) => format!("{:?} {spec}", self.sampler),
            Respacing::Explicit(v) => format!("{:?} {} steps", self.sampler, v.len()),
        }
    }

    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.kind()?;
        self.clip.validate()
    }

    /// The sampler with its parameters.
    pub fn kind(&self) -> Result<SamplerKind> {
        let bad = |m: String| Err(DiffusionError::InvalidConfig(m));
        match (self.sampler, self.eta) {
            (SamplerName::Ddim, eta) => {
                let eta = eta.unwrap_or(0.0);
                if !(eta.is_finite() && eta >= 0.0) {
                    return bad(format!("sampling.eta must be >= 0, got {eta}"));
                }
                Ok(SamplerKind::Ddim { eta })
            }
            (name, Some(_)) => bad(format!("sampling.eta applies to ddim only, not {name:?}")),
            (SamplerName::Ddpm, None) => Ok(SamplerKind::Ddpm),
            (SamplerName::DpmPp2M, None) => Ok(SamplerKind::DpmSolverPp2M),
        }
    }

    /// The respaced process this sampler walks, for a model trained with `diffusion`.
    pub fn build(&self, diffusion: &DiffusionConfig) -> Result<(GaussianDiffusion, SamplerKind)> {
        self.validate()?;
        Ok((
            GaussianDiffusion::respaced(diffusion, &self.steps)?,
            self.kind()?,
        ))
    }
}

/// How [`GaussianDiffusion::ddim_invert`] refines each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    /// At most this many extra model calls per step (0: the classic inversion).
    pub max_iters: usize,
    /// A step's iterations stop once no element of the batch moves by more than this (0: once x
    /// is unchanged), so a batch's latents depend slightly on what else is in it.
    pub tolerance: f64,
}

impl FixedPoint {
    /// `n` iterations per step, fewer only where x stops changing altogether.
    pub fn iters(n: usize) -> Self {
        Self {
            max_iters: n,
            tolerance: 0.0,
        }
    }
}

/// Where a sampling loop is: `step` of `total` (1-based), at process step `t`.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
    pub t: usize,
}

/// Runs a model closure and checks what it returns.
fn call_model<F, E>(
    model: &mut F,
    diffusion: &GaussianDiffusion,
    x: &Tensor,
    t: &Tensor,
) -> Result<Tensor>
where
    F: FnMut(&Tensor, &Tensor) -> std::result::Result<Tensor, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let model_t = diffusion.model_timesteps(t)?;
    model(x, &model_t).map_err(|e| DiffusionError::Model(e.into()))
}

fn step_timesteps(x: &Tensor, i: usize) -> Tensor {
    Tensor::full([x.size()[0]], i as i64, (Kind::Int64, x.device()))
}

/// A mask [B, 1, ...] that is 0 where t == 0 (no noise is added at the last step).
fn nonzero_mask(t: &Tensor, like: &Tensor) -> Result<Tensor> {
    broadcast_to(&t.f_ne(0)?.f_to_kind(like.kind())?, like.dim())
}

impl GaussianDiffusion {
    /// One DDPM ancestral step x_t → x_{t-1} from the network output at (x_t, t).
    pub fn ddpm_step(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        clip: &ClipDenoised,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let out = self.p_mean_variance(model_output, x_t, t, clip)?;
        let std = (&out.log_variance * 0.5).exp();
        Ok(out.mean + nonzero_mask(t, x_t)? * std * noise)
    }

    /// One DDIM step x_t → x_{t-1} (guided-diffusion `ddim_sample`); `noise` is used when η > 0.
    pub fn ddim_step(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        eta: f64,
        clip: &ClipDenoised,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let out = self.p_mean_variance(model_output, x_t, t, clip)?;
        let ab = self.gather(Coef::AlphasCumprod, t, x_t)?;
        let ab_prev = self.gather(Coef::AlphasCumprodPrev, t, x_t)?;
        let sigma = (ab_prev.rsub_scalar(1.0) / ab.rsub_scalar(1.0)).sqrt()
            * (&ab / &ab_prev).rsub_scalar(1.0).sqrt()
            * eta;
        let mean = &out.pred_xstart * ab_prev.sqrt()
            + (ab_prev.rsub_scalar(1.0) - sigma.square())
                .clamp_min(0.0)
                .sqrt()
                * &out.pred_eps;
        Ok(mean + nonzero_mask(t, x_t)? * sigma * noise)
    }

    /// x_0 predicted by the output at (x_t, t), clipped: DPM-Solver++'s data prediction.
    pub fn predict_xstart(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        clip: &ClipDenoised,
    ) -> Result<Tensor> {
        self.check_timesteps(t, x_t)?;
        let (mean_out, _) = self.split_output(model_output, x_t)?;
        let (x0, _) = self.predict_xstart_eps(&mean_out, x_t, t)?;
        clip.apply(&x0)
    }

    /// One DPM-Solver++ step from process step `t` to `t - 1` (or to clean data from step 0).
    /// `x0_pred` is the data prediction at t; `prev` the one at the step before (t + 1), if the
    /// second-order update is wanted. The first and last steps are first order (as diffusers).
    pub fn dpm_solver_pp_step(
        &self,
        x_t: &Tensor,
        t: usize,
        x0_pred: &Tensor,
        prev: Option<&Tensor>,
    ) -> Result<Tensor> {
        let n = self.num_timesteps();
        if t >= n {
            return Err(DiffusionError::TimestepOutOfRange {
                value: t as i64,
                num_timesteps: n,
            });
        }
        if t == 0 {
            // σ_next = 0: the update lands exactly on the data prediction.
            return Ok(x0_pred.shallow_clone());
        }
        let ac = self.alphas_cumprod();
        let lambda = |i: usize| self.half_log_snr(i);
        let (a_next, s_next) = (ac[t - 1].sqrt(), (1.0 - ac[t - 1]).sqrt());
        let s_cur = (1.0 - ac[t]).sqrt();
        let h = lambda(t - 1) - lambda(t);
        let phi = (-h).exp_m1(); // e^{-h} − 1
        let first = x_t * (s_next / s_cur) - x0_pred * (a_next * phi);
        Ok(match prev {
            Some(prev_x0) if t + 1 < n => {
                let r0 = (lambda(t) - lambda(t + 1)) / h;
                let d1 = (x0_pred - prev_x0) * (1.0 / r0);
                first - d1 * (0.5 * a_next * phi)
            }
            _ => first,
        })
    }

    /// λ_i = log(α_i / σ_i) = ½·log(ᾱ_i / (1 − ᾱ_i)) at step i of this process.
    pub fn half_log_snr(&self, i: usize) -> f64 {
        let ab = self.alphas_cumprod()[i];
        0.5 * (ab / (1.0 - ab)).ln()
    }

    /// Samples from x_T (`noise`) down to x_0 with `kind`, calling `model(x_t, t_model)`.
    /// `progress` is called after every step.
    pub fn sample<F, E>(
        &self,
        kind: SamplerKind,
        clip: &ClipDenoised,
        noise: Tensor,
        model: F,
        progress: Option<&mut dyn FnMut(Progress)>,
    ) -> Result<Tensor>
    where
        F: FnMut(&Tensor, &Tensor) -> std::result::Result<Tensor, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let last = self.num_timesteps() - 1;
        self.sample_from(kind, clip, noise, last, model, progress)
    }

    /// The step SDEdit / diffusers' img2img start from at `strength` in (0, 1]: of this process's
    /// n steps the last ⌊n·strength⌋ are run, so the start is step ⌊n·strength⌋ − 1 (strength 1:
    /// the whole process). Errors when that leaves no step.
    pub fn strength_start(&self, strength: f64) -> Result<usize> {
        let n = self.num_timesteps();
        let steps = (n as f64 * strength).floor();
        if !(strength > 0.0 && strength <= 1.0) || steps < 1.0 {
            return Err(DiffusionError::InvalidConfig(format!(
                "strength {strength} must be in (0, 1] and leave at least one of the {n} steps"
            )));
        }
        Ok(steps as usize - 1)
    }

    /// Walks the process from `x`, a sample at step `start` of this process (x_T for the whole
    /// process; for SDEdit, an image noised there with [`GaussianDiffusion::q_sample`]), down to
    /// x_0: `start + 1` model calls.
    pub fn sample_from<F, E>(
        &self,
        kind: SamplerKind,
        clip: &ClipDenoised,
        x: Tensor,
        start: usize,
        mut model: F,
        mut progress: Option<&mut dyn FnMut(Progress)>,
    ) -> Result<Tensor>
    where
        F: FnMut(&Tensor, &Tensor) -> std::result::Result<Tensor, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _guard = tch::no_grad_guard();
        let n = self.num_timesteps();
        if start >= n {
            return Err(DiffusionError::TimestepOutOfRange {
                value: start as i64,
                num_timesteps: n,
            });
        }
        let mut x = x;
        let mut prev_x0: Option<Tensor> = None;
        for (step, i) in (0..=start).rev().enumerate() {
            let t = step_timesteps(&x, i);
            let out = call_model(&mut model, self, &x, &t)?;
            // The last step adds no noise, so none is drawn: the generator then stands where
            // diffusers' schedulers leave it (they draw only for t > 0).
            let noise = |stochastic: bool| {
                if stochastic && i > 0 {
                    x.randn_like()
                } else {
                    x.zeros_like()
                }
            };
            x = match kind {
                SamplerKind::Ddpm => self.ddpm_step(&out, &x, &t, clip, &noise(true))?,
                SamplerKind::Ddim { eta } => {
                    self.ddim_step(&out, &x, &t, eta, clip, &noise(eta > 0.0))?
                }
                SamplerKind::DpmSolverPp2M => {
                    let x0 = self.predict_xstart(&out, &x, &t, clip)?;
                    let next = self.dpm_solver_pp_step(&x, i, &x0, prev_x0.as_ref())?;
                    prev_x0 = Some(x0);
                    next
                }
            };
            if let Some(cb) = progress.as_deref_mut() {
                cb(Progress {
                    step: step + 1,
                    total: start + 1,
                    t: i,
                });
            }
        }
        Ok(x)
    }

    /// Deterministic DDIM inversion x_0 → x_T: the latent that [`SamplerKind::Ddim`] with η = 0
    /// decodes back to `x_start` (unCLIP's bipartite latent). Each step runs the DDIM update
    /// backwards from noise level ᾱ_{j-1} to ᾱ_j (ᾱ_{-1} = 1 for the clean sample). The classic
    /// inversion (no fixed-point iterations, as guided-diffusion) uses ε at the level it leaves,
    /// which makes the round trip only approximate; each fixed-point iteration re-evaluates ε at
    /// the level it reaches, which is what the sampler will see, so the round trip becomes exact
    /// as iterations converge. Costs n·(1 + iterations) model calls for n steps; no clipping.
    ///
    /// An ε-predicting model's round trip is ill-conditioned where ᾱ is tiny (the cosine
    /// schedule's last steps: ᾱ_999 ≈ 2e-9): the sampler divides its ε's error by √ᾱ there. Walk
    /// steps that stop short of them (`ddimN` spacing) for such models.
    pub fn ddim_invert<F, E>(
        &self,
        x_start: Tensor,
        fixed_point: FixedPoint,
        mut model: F,
        mut progress: Option<&mut dyn FnMut(Progress)>,
    ) -> Result<Tensor>
    where
        F: FnMut(&Tensor, &Tensor) -> std::result::Result<Tensor, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _guard = tch::no_grad_guard();
        let n = self.num_timesteps();
        let ac = self.alphas_cumprod().to_vec();
        let mut eps_at = |x: &Tensor, j: usize| -> Result<Tensor> {
            let t = step_timesteps(x, j);
            let out = call_model(&mut model, self, x, &t)?;
            Ok(self
                .p_mean_variance(&out, x, &t, &ClipDenoised::None)?
                .pred_eps)
        };
        let mut x = x_start;
        let mut prev_ab = 1.0f64;
        let mut eps = eps_at(&x, 0)?;
        for (j, &ab) in ac.iter().enumerate() {
            let ddim_up = |x: &Tensor, e: &Tensor| {
                let x0 = (x - e * (1.0 - prev_ab).sqrt()) / prev_ab.sqrt();
                x0 * ab.sqrt() + e * (1.0 - ab).sqrt()
            };
            let mut next = ddim_up(&x, &eps);
            for _ in 0..fixed_point.max_iters {
                let refined = ddim_up(&x, &eps_at(&next, j)?);
                let moved = (&refined - &next).abs().max().double_value(&[]);
                next = refined;
                if moved <= fixed_point.tolerance {
                    break;
                }
            }
            x = next;
            prev_ab = ab;
            if j + 1 < n {
                eps = eps_at(&x, j)?;
            }
            if let Some(cb) = progress.as_deref_mut() {
                cb(Progress {
                    step: j + 1,
                    total: n,
                    t: j,
                });
            }
        }
        Ok(x)
    }
}
