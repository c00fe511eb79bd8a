//! Sinusoidal timestep embeddings (Vaswani et al. 2017, as guided-diffusion's
//! `timestep_embedding`: cos first, then sin) and the MLP that follows them in ADM.

use super::init;
use crate::error::{shape_err, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// [B] timesteps (any numeric kind; fractional ones allowed) → [B, dim] embeddings in f32.
pub fn timestep_embedding(t: &Tensor, dim: i64, max_period: f64) -> Result<Tensor> {
    if t.dim() != 1 {
        return Err(shape_err(
            "timestep_embedding",
            format!("t must be [B], got {:?}", t.size()),
        ));
    }
    if dim < 2 {
        return Err(shape_err(
            "timestep_embedding",
            format!("dim must be >= 2, got {dim}"),
        ));
    }
    let half = dim / 2;
    // In f64: t·freq reaches 1e3, where f32 would lose 1e-4 of the phase.
    let freqs =
        (Tensor::arange(half, (Kind::Double, t.device())) * (-max_period.ln() / half as f64)).exp();
    let args = t.f_to_kind(Kind::Double)?.f_unsqueeze(1)? * freqs.unsqueeze(0);
    let mut emb = Tensor::f_cat(&[args.cos(), args.sin()], -1)?.f_to_kind(Kind::Float)?;
    if dim % 2 == 1 {
        emb = Tensor::f_cat(&[&emb, &emb.narrow(1, 0, 1).zeros_like()], -1)?;
    }
    Ok(emb)
}

/// Linear → SiLU → Linear on the sinusoidal embedding (diffusers `TimestepEmbedding`).
#[derive(Debug)]
pub struct TimestepMlp {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepMlp {
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64) -> Self {
        Self::with_hidden(p, in_dim, out_dim, out_dim)
    }

    /// in → hidden → out (diffusers' `TimestepEmbedding` with `out_dim`, as the prior uses it).
    pub fn with_hidden(p: nn::Path, in_dim: i64, hidden_dim: i64, out_dim: i64) -> Self {
        Self {
            linear_1: init::linear(&p / "linear_1", in_dim, hidden_dim),
            linear_2: init::linear(&p / "linear_2", hidden_dim, out_dim),
        }
    }

    pub fn forward(&self, emb: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(emb).silu())
    }
}
