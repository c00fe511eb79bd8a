//! The unCLIP diffusion prior (Ramesh et al. 2022, §2.2): a decoder-only transformer with a causal
//! mask over [caption token features, z_t, timestep embedding, noised z_i, learned query token];
//! the query token's output predicts the clean z_i. Module paths and computation are those of
//! diffusers' `PriorTransformer`, so its state dicts (Karlo's prior) load with no mapping.

use anyhow::{ensure, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};
use unclip_diffusion::nn::attention::{AttentionMask, MultiHeadAttention};
use unclip_diffusion::nn::checkpoint::{checkpoint_one, Shared};
use unclip_diffusion::nn::timestep::{timestep_embedding, TimestepMlp};

use crate::config::PriorConfig;
pub use unclip_clip::caption::TextCondition;

/// diffusers' `BasicTransformerBlock` with self-attention only: x + attn(norm1(x)), then
/// x + ff(norm3(x)); the MLP is GELU with 4× width.
#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    attn1: MultiHeadAttention,
    norm3: nn::LayerNorm,
    ff_in: nn::Linear,
    ff_out: nn::Linear,
    dropout: f64,
}

impl Block {
    fn new(p: nn::Path, dim: i64, heads: i64, dropout: f64) -> Result<Self> {
        let ln = nn::LayerNormConfig::default();
        Ok(Self {
            norm1: nn::layer_norm(&p / "norm1", vec![dim], ln),
            attn1: MultiHeadAttention::new(&p / "attn1", dim, dim, heads)?,
            norm3: nn::layer_norm(&p / "norm3", vec![dim], ln),
            ff_in: nn::linear(
                &p / "ff" / "net" / "0" / "proj",
                dim,
                4 * dim,
                Default::default(),
            ),
            ff_out: nn::linear(&p / "ff" / "net" / "2", 4 * dim, dim, Default::default()),
            dropout,
        })
    }

    fn forward_t(&self, x: &Tensor, mask: AttentionMask, train: bool) -> Result<Tensor> {
        let a = self.attn1.forward(&self.norm1.forward(x), None, mask)?;
        let x = x + a.dropout(self.dropout, train);
        let h = self
            .ff_in
            .forward(&self.norm3.forward(&x))
            .gelu("none")
            .dropout(self.dropout, train);
        Ok(&x + self.ff_out.forward(&h))
    }
}

/// A training block, its activations recomputed in backward; the padding mask is a constant of
/// the batch.
fn checkpointed(block: &Shared<Block>, h: &Tensor, key_padding: &Tensor) -> Result<Tensor> {
    let block = block.clone();
    let key_padding = key_padding.shallow_clone();
    Ok(checkpoint_one(&[h], move |xs: &[Tensor]| {
        let mask = AttentionMask {
            causal: true,
            key_padding: Some(&key_padding),
        };
        block.forward_t(&xs[0], mask, true)
    })?)
}

#[derive(Debug)]
pub struct DiffusionPrior {
    time_embedding: TimestepMlp,
    proj_in: nn::Linear,
    embedding_proj_norm: Option<nn::LayerNorm>,
    embedding_proj: nn::Linear,
    encoder_hidden_states_proj: nn::Linear,
    positional_embedding: Tensor,
    prd_embedding: Tensor,
    blocks: Vec<Shared<Block>>,
    norm_in: Option<nn::LayerNorm>,
    norm_out: nn::LayerNorm,
    proj_to_clip_embeddings: nn::Linear,
    /// Per-dimension mean and std of the training z_i: the diffusion runs on standardised
    /// embeddings. Not trained; set from data before training (see [`DiffusionPrior::set_clip_stats`]).
    clip_mean: Tensor,
    clip_std: Tensor,
    pub cfg: PriorConfig,
    /// Recompute the transformer blocks' activations in backward (see
    /// [`DiffusionPrior::set_gradient_checkpointing`]).
    gradient_checkpointing: bool,
}

impl DiffusionPrior {
    /// Builds the prior under `p` (the root, for diffusers' names).
    pub fn new(p: nn::Path, cfg: &PriorConfig) -> Result<Self> {
        cfg.validate()?;
        let inner = cfg.inner_dim();
        let d = cfg.embedding_dim;
        let ln = nn::LayerNormConfig::default();
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                Block::new(
                    &p / "transformer_blocks" / i,
                    inner,
                    cfg.num_attention_heads,
                    cfg.dropout,
                )
                .map(Shared::new)
            })
            .collect::<Result<Vec<_>>>()?;
        let clip_mean = p.zeros_no_train("clip_mean", &[1, d]);
        let clip_std = p.ones_no_train("clip_std", &[1, d]);
        Ok(Self {
            time_embedding: TimestepMlp::with_hidden(
                &p / "time_embedding",
                inner,
                cfg.time_embed_dim(),
                inner,
            ),
            proj_in: nn::linear(&p / "proj_in", d, inner, Default::default()),
            embedding_proj_norm: cfg.embedding_proj_norm_type.map(|_| {
                nn::layer_norm(
                    &p / "embedding_proj_norm",
                    vec![cfg.embedding_proj_dim()],
                    ln,
                )
            }),
            embedding_proj: nn::linear(
                &p / "embedding_proj",
                cfg.embedding_proj_dim(),
                inner,
                Default::default(),
            ),
            encoder_hidden_states_proj: nn::linear(
                &p / "encoder_hidden_states_proj",
                d,
                inner,
                Default::default(),
            ),
            positional_embedding: p.var(
                "positional_embedding",
                &[1, cfg.sequence_length(), inner],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            prd_embedding: p.var(
                "prd_embedding",
                &[1, 1, inner],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            blocks,
            norm_in: cfg
                .norm_in_type
                .map(|_| nn::layer_norm(&p / "norm_in", vec![inner], ln)),
            norm_out: nn::layer_norm(&p / "norm_out", vec![inner], ln),
            proj_to_clip_embeddings: nn::linear(
                &p / "proj_to_clip_embeddings",
                inner,
                d,
                Default::default(),
            ),
            clip_mean,
            clip_std,
            cfg: cfg.clone(),
            gradient_checkpointing: false,
        })
    }

    /// The raw prediction (standardised clean z_i) for noised standardised `x_t` [B, D] at
    /// training timesteps `t` [B] given the text.
    pub fn forward_t(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        text: &TextCondition,
        train: bool,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let b = x_t.size()[0];
        ensure!(
            x_t.size() == [b, c.embedding_dim],
            "prior input: x_t must be [B, {}], got {:?}",
            c.embedding_dim,
            x_t.size()
        );
        ensure!(
            text.tokens.size() == [b, c.num_embeddings, c.embedding_dim],
            "prior input: caption token features must be [{b}, {}, {}], got {:?}",
            c.num_embeddings,
            c.embedding_dim,
            text.tokens.size()
        );
        ensure!(
            text.mask.size() == [b, c.num_embeddings],
            "prior input: token mask must be [{b}, {}], got {:?}",
            c.num_embeddings,
            text.mask.size()
        );
        ensure!(
            text.text_embeds.size() == [b, c.embedding_proj_dim()],
            "prior input: z_t must be [{b}, {}], got {:?}",
            c.embedding_proj_dim(),
            text.text_embeds.size()
        );
        let inner = c.inner_dim();
        let temb = self
            .time_embedding
            .forward(&timestep_embedding(t, inner, 10_000.0)?.to_device(x_t.device()));
        let z_t = match &self.embedding_proj_norm {
            Some(norm) => norm.forward(&text.text_embeds),
            None => text.text_embeds.shallow_clone(),
        };
        let seq = Tensor::f_cat(
            &[
                self.encoder_hidden_states_proj.forward(&text.tokens),
                self.embedding_proj.forward(&z_t).unsqueeze(1),
                temb.unsqueeze(1),
                self.proj_in.forward(x_t).unsqueeze(1),
                self.prd_embedding.expand([b, 1, inner], false),
            ],
            1,
        )?;
        let mut h = seq + &self.positional_embedding;
        if let Some(norm) = &self.norm_in {
            h = norm.forward(&h);
        }
        let extra = Tensor::ones(
            [b, c.additional_embeddings],
            (Kind::Bool, text.mask.device()),
        );
        let key_padding = Tensor::f_cat(&[&text.mask.to_kind(Kind::Bool), &extra], 1)?;
        let mask = AttentionMask {
            causal: true,
            key_padding: Some(&key_padding),
        };
        let checkpointing = train && self.gradient_checkpointing;
        for block in &self.blocks {
            h = if checkpointing {
                checkpointed(block, &h, &key_padding)?
            } else {
                block.forward_t(&h, mask, train)?
            };
        }
        let last = self.norm_out.forward(&h).select(1, -1);
        Ok(self.proj_to_clip_embeddings.forward(&last))
    }

    /// With `on`, training forward passes keep only each transformer block's input and recompute
    /// its activations in backward (`prior.gradient_checkpointing`); gradients are unchanged.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// z_i → the standardised space the diffusion runs in.
    pub fn standardize(&self, z: &Tensor) -> Tensor {
        (z - &self.clip_mean) / &self.clip_std
    }

    /// The standardised space → z_i (diffusers' `post_process_latents`).
    pub fn unstandardize(&self, x: &Tensor) -> Tensor {
        x * &self.clip_std + &self.clip_mean
    }

    /// Sets the standardisation from training image embeddings [N, D]: per-dimension mean and
    /// standard deviation (floored, so a constant dimension cannot divide by zero).
    pub fn set_clip_stats(&mut self, image_embeds: &Tensor) -> Result<()> {
        let d = self.cfg.embedding_dim;
        ensure!(
            image_embeds.dim() == 2 && image_embeds.size()[1] == d && image_embeds.size()[0] >= 2,
            "clip statistics need [N >= 2, {d}] image embeddings, got {:?}",
            image_embeds.size()
        );
        let z = image_embeds
            .to_kind(Kind::Float)
            .to_device(self.clip_mean.device());
        let mean = z.mean_dim(0, true, Kind::Float);
        let std = z.std_dim(0, true, true).clamp_min(1e-4);
        tch::no_grad(|| {
            self.clip_mean.copy_(&mean);
            self.clip_std.copy_(&std);
        });
        Ok(())
    }

    pub fn clip_stats(&self) -> (&Tensor, &Tensor) {
        (&self.clip_mean, &self.clip_std)
    }
}

/// GPT-2-style initialisation: linear weights N(0, 0.02), zero biases (tch's default Kaiming
/// bounds are √6 larger than PyTorch's and train transformers worse). Variables are visited in
/// name order so one seed always gives the same weights. `prefix` is where the prior sits in `vs`.
pub fn init_prior_weights(vs: &nn::VarStore, prefix: &str) {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut v) in vars {
            if name.ends_with(".bias") && !name.contains("norm") {
                let _ = v.zero_();
            } else if v.dim() == 2 && name.ends_with(".weight") {
                let _ = v.normal_(0.0, 0.02);
            }
        }
    });
}
