//! The diffusion core shared by unCLIP's priors, decoder and upsamplers: noise schedules and
//! respacing, the forward and posterior processes, ε / x0 / v parameterisations with fixed or
//! learned variances, MSE and hybrid losses, DDPM / DDIM / DDIM-inversion / DPM-Solver++(2M)
//! samplers, classifier-free guidance, self-conditioning, shared neural blocks and embedding helpers.
//! Timesteps are batched everywhere: `t: &Tensor` of shape [B], int64.

pub mod device;
pub mod embedding;
pub mod error;
pub mod gaussian;
pub mod guidance;
pub mod nn;
pub mod sampling;
pub mod schedule;
pub mod self_condition;
pub mod toy;

pub use embedding::{l2_normalize, slerp};
pub use error::{DiffusionError, Result};
pub use gaussian::{
    ClipDenoised, DiffusionConfig, GaussianDiffusion, LossType, MeanType, PMeanVariance,
    TimestepEmphasis, TrainingLosses, VarianceType,
};
pub use guidance::{classifier_free_guidance, guide_output, replace_rows};
pub use sampling::{FixedPoint, Progress, SamplerConfig, SamplerKind, SamplerName};
pub use schedule::{space_timesteps, BetaSchedule, Respacing};
pub use self_condition::{self_conditioned, training_estimate};
