//! unCLIP's diffusion prior P(z_i | y): the model (diffusers `PriorTransformer` layout), guided
//! sampling with candidates reranked by z_i · z_t, and the `train-prior` task.

pub mod config;
pub mod load;
pub mod model;
pub mod sample;
pub mod task;

pub use config::PriorConfig;
pub use model::{init_prior_weights, DiffusionPrior, TextCondition};
