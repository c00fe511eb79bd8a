//! The training runtime every unCLIP trainer shares. A model crate supplies a [`TrainTask`]
//! ("build the model", "loss for a batch"); this crate owns the loop: configs, AdamW with
//! savable state, learning-rate schedule, gradient clipping and accumulation, EMA, atomic
//! checkpoints with exact resume (and a checkpoint on SIGTERM), TensorBoard scalars and
//! `metrics.jsonl`, a progress display, and data parallelism over c10d (gradients averaged during
//! backward, as DDP) with optional ZeRO-1 / ZeRO-2.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod distributed;
pub mod ema;
pub mod logging;
pub mod loss_scale;
pub mod lr;
pub mod malloc;
pub mod multi_tensor;
pub mod optim;
pub mod precision;
pub mod publish;
pub mod shard;
pub mod stop;
pub mod toy;
pub mod trainer;

/// Every variable of `vs` with its path, in name order: the order optimiser state, EMA shadows,
/// broadcasts and checkpoints share, identical on every rank.
pub fn named_variables(vs: &tch::nn::VarStore) -> Vec<(String, tch::Tensor)> {
    let mut v: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub use cli::TrainArgs;
pub use config::{load_config, RunConfig, TrainConfig};
pub use trainer::{train, StepOutput, TrainSummary, TrainTask};
