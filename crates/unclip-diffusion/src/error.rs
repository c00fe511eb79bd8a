//! Errors of the diffusion core. Each names the offending value so a user can fix a config or a call.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DiffusionError {
    #[error("unknown noise schedule `{0}` (expected `linear` or `cosine`)")]
    UnknownSchedule(String),
    #[error("invalid respacing `{spec}`: {reason}")]
    InvalidRespacing { spec: String, reason: String },
    #[error("invalid diffusion config: {0}")]
    InvalidConfig(String),
    #[error("timestep {value} out of range: this diffusion has {num_timesteps} steps (valid 0..{num_timesteps})")]
    TimestepOutOfRange { value: i64, num_timesteps: usize },
    #[error("shape mismatch in {context}: {detail}")]
    Shape {
        context: &'static str,
        detail: String,
    },
    #[error("the model closure failed: {0}")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("checkpointed block: {0}")]
    Checkpoint(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = DiffusionError> = std::result::Result<T, E>;

pub(crate) fn shape_err(context: &'static str, detail: impl Into<String>) -> DiffusionError {
    DiffusionError::Shape {
        context,
        detail: detail.into(),
    }
}
