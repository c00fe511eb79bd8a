//! unCLIP's priors P(z_i | y): the diffusion prior (diffusers `PriorTransformer` layout) and the
//! autoregressive prior (quantised principal components of z_i predicted in order), guided
//! sampling with candidates reranked by z_i · z_t, and the `train-prior` task.

pub mod autoregressive;
pub mod codec;
pub mod config;
pub mod load;
pub mod model;
pub mod prior;
pub mod sample;
pub mod task;

pub use autoregressive::{ArPriorConfig, ArSampling, AutoregressivePrior};
pub use codec::EmbeddingCodec;
pub use config::PriorConfig;
pub use model::{init_prior_weights, DiffusionPrior, TextCondition};
pub use prior::{Prior, PriorSampling};
