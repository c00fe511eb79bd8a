//! GLIDE's attention block (Nichol et al. 2021): the image tokens attend to themselves and to the
//! conditioning sequence, whose keys and values come from separate projections — diffusers'
//! `Attention` with `added_kv_proj_dim` run by `AttnAddedKVProcessor`, as its SimpleCrossAttn
//! blocks build it. Residual: x + out(attn(group_norm(x))).

use anyhow::{ensure, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};
use unclip_diffusion::nn::attention::{fused_linear, split_heads};
use unclip_diffusion::nn::init;

#[derive(Debug)]
pub struct AddedKvAttention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    add_k_proj: nn::Linear,
    add_v_proj: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
    head_dim: i64,
    channels: i64,
    context_dim: i64,
}

impl AddedKvAttention {
    /// `channels` of the feature map, `heads × head_dim` inner width, `context_dim` the width of
    /// the conditioning sequence, `groups` of the GroupNorm.
    pub fn new(
        p: nn::Path,
        channels: i64,
        heads: i64,
        head_dim: i64,
        context_dim: i64,
        groups: i64,
    ) -> Result<Self> {
        ensure!(
            channels % groups == 0,
            "attention: {channels} channels do not split into {groups} groups"
        );
        let inner = heads * head_dim;
        let linear = |name: &str, i: i64, o: i64| init::linear(&p / name, i, o);
        Ok(Self {
            group_norm: nn::group_norm(
                &p / "group_norm",
                groups,
                channels,
                nn::GroupNormConfig {
                    eps: 1e-5,
                    ..Default::default()
                },
            ),
            to_q: linear("to_q", channels, inner),
            to_k: linear("to_k", channels, inner),
            to_v: linear("to_v", channels, inner),
            add_k_proj: linear("add_k_proj", context_dim, inner),
            add_v_proj: linear("add_v_proj", context_dim, inner),
            to_out: init::linear(&p / "to_out" / "0", inner, channels),
            heads,
            head_dim,
            channels,
            context_dim,
        })
    }

    /// x: [B, C, H, W]; context: [B, S, context_dim]; context_mask: [B, S] bool (true = real
    /// token; None = all real). Returns [B, C, H, W].
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        context_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let size = x.size();
        ensure!(
            size.len() == 4 && size[1] == self.channels,
            "attention input: expected [B, {}, H, W], got {size:?}",
            self.channels
        );
        let (b, hw) = (size[0], size[2] * size[3]);
        let cs = context.size();
        ensure!(
            cs.len() == 3 && cs[0] == b && cs[2] == self.context_dim,
            "attention context: expected [{b}, S, {}], got {cs:?}",
            self.context_dim
        );
        // Image tokens [B, HW, C], made contiguous once here rather than by each projection.
        let h = self
            .group_norm
            .forward(x)
            .f_view([b, self.channels, hw])?
            .f_transpose(1, 2)?
            .f_contiguous()?;
        let qkv = fused_linear(&h, &[&self.to_q, &self.to_k, &self.to_v])?;
        let [q, k_img, v_img]: [Tensor; 3] = split_heads(&qkv, 3, self.heads)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("three projections"))?;
        let kv = fused_linear(context, &[&self.add_k_proj, &self.add_v_proj])?;
        let [k_ctx, v_ctx]: [Tensor; 2] = split_heads(&kv, 2, self.heads)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("two projections"))?;
        // Keys and values: the context's first, then the image tokens' (diffusers' order).
        let k = Tensor::f_cat(&[k_ctx, k_img], 2)?;
        let v = Tensor::f_cat(&[v_ctx, v_img], 2)?;
        let mask = match context_mask {
            None => None,
            Some(m) => {
                ensure!(
                    m.size() == [b, cs[1]],
                    "attention context mask: expected [{b}, {}], got {:?}",
                    cs[1],
                    m.size()
                );
                let image = Tensor::ones([b, hw], (Kind::Bool, m.device()));
                Some(
                    Tensor::f_cat(&[&m.to_kind(Kind::Bool), &image], 1)?.f_view([
                        b,
                        1,
                        1,
                        cs[1] + hw,
                    ])?,
                )
            }
        };
        // Under bf16 / fp16 the inputs stay in that precision: every SDPA backend (CPU and CUDA
        // flash, memory-efficient, and math unless allow_fp16_bf16_reduction_math_sdp) already
        // accumulates the scores and their softmax in f32, which is diffusers' upcast_softmax.
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            0.0,
            false,
            None,
            false,
        )?;
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([b, hw, self.heads * self.head_dim])?;
        let out = self
            .to_out
            .forward(&out)
            .f_transpose(1, 2)?
            // Back to standard NCHW: a transposed view here would make the residual sum, and with
            // it every later layer, channels-last, whose GroupNorm kernels are slower on CPU.
            .f_contiguous()?
            .f_view(size.as_slice())?;
        Ok(out + x)
    }
}
