//! Pre-LN transformer block (GPT-2 / CLIP / GLIDE layout): x + attn(ln_1(x)), then x + mlp(ln_2(x)).

use super::attention::{AttentionMask, KvCache, MultiHeadAttention};
use crate::error::Result;
use tch::nn::{self, Module};
use tch::Tensor;

#[derive(Debug)]
pub struct TransformerBlock {
    ln_1: nn::LayerNorm,
    attn: MultiHeadAttention,
    ln_2: nn::LayerNorm,
    c_fc: nn::Linear,
    c_proj: nn::Linear,
}

impl TransformerBlock {
    /// width `dim`, `heads` heads, MLP hidden width `mlp_ratio · dim` (4 in GPT-2 and CLIP).
    pub fn new(p: nn::Path, dim: i64, heads: i64, mlp_ratio: i64) -> Result<Self> {
        let ln = nn::LayerNormConfig {
            eps: 1e-5,
            ..Default::default()
        };
        Ok(Self {
            ln_1: nn::layer_norm(&p / "ln_1", vec![dim], ln),
            attn: MultiHeadAttention::new(&p / "attn", dim, dim, heads)?,
            ln_2: nn::layer_norm(&p / "ln_2", vec![dim], ln),
            c_fc: nn::linear(
                &p / "mlp" / "c_fc",
                dim,
                mlp_ratio * dim,
                Default::default(),
            ),
            c_proj: nn::linear(
                &p / "mlp" / "c_proj",
                mlp_ratio * dim,
                dim,
                Default::default(),
            ),
        })
    }

    /// x: [B, L, dim] → [B, L, dim].
    pub fn forward(&self, x: &Tensor, mask: AttentionMask) -> Result<Tensor> {
        let x = x + self.attn.forward(&self.ln_1.forward(x), None, mask)?;
        Ok(self.mlp_residual(&x))
    }

    /// x + mlp(ln_2(x)).
    fn mlp_residual(&self, x: &Tensor) -> Tensor {
        let h = self.c_fc.forward(&self.ln_2.forward(x)).gelu("none");
        x + self.c_proj.forward(&h)
    }

    /// [`Self::forward`] of the next tokens with a causal mask, attending to the tokens in
    /// `cache` too (see [`MultiHeadAttention::forward_cached`]).
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        key_padding: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = x + self
            .attn
            .forward_cached(&self.ln_1.forward(x), cache, key_padding)?;
        Ok(self.mlp_residual(&x))
    }
}
