//! The training runtime every unCLIP trainer shares. A model crate supplies a [`TrainTask`]
//! ("build the model", "loss for a batch"); this crate owns the loop: configs, AdamW with
//! savable state, learning-rate schedule, gradient clipping and accumulation, EMA, atomic
//! checkpoints with exact resume, TensorBoard scalars and a progress display.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod distributed;
pub mod ema;
pub mod logging;
pub mod lr;
pub mod optim;
pub mod precision;
pub mod toy;
pub mod trainer;

pub use cli::TrainArgs;
pub use config::{load_config, RunConfig, TrainConfig};
pub use trainer::{train, StepOutput, TrainSummary, TrainTask};
