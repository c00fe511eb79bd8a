//! The prior's shape. Field names and defaults are those of diffusers' `PriorTransformer` config,
//! so a diffusers `config.json` (e.g. Karlo's `prior/config.json`) parses as it is.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// A LayerNorm or nothing, as diffusers' `norm_in_type` / `embedding_proj_norm_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormType {
    Layer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorConfig {
    pub num_attention_heads: i64,
    pub attention_head_dim: i64,
    /// Transformer blocks.
    pub num_layers: i64,
    /// CLIP embedding width: z_i, z_t and the caption token features.
    pub embedding_dim: i64,
    /// Caption tokens (the CLIP text encoder's context length).
    pub num_embeddings: i64,
    /// Tokens after the caption: z_t, the timestep, z_i^(t) and the final query token.
    pub additional_embeddings: i64,
    /// Dropout after attention and in the MLPs while training.
    pub dropout: f64,
    /// Only `silu` (diffusers' default and Karlo's).
    pub time_embed_act_fn: String,
    pub norm_in_type: Option<NormType>,
    pub embedding_proj_norm_type: Option<NormType>,
    /// Only `linear`: the caption token features are always projected.
    pub encoder_hid_proj_type: Option<String>,
    /// Only `prd`: the learned final query token whose output is the prediction.
    pub added_emb_type: Option<String>,
    /// Hidden width of the timestep MLP (default: the transformer width).
    pub time_embed_dim: Option<i64>,
    /// Width of z_t (default: embedding_dim).
    pub embedding_proj_dim: Option<i64>,
    /// Width of the output (default: embedding_dim; must equal it for diffusion).
    pub clip_embed_dim: Option<i64>,
}

impl Default for PriorConfig {
    fn default() -> Self {
        Self {
            num_attention_heads: 32,
            attention_head_dim: 64,
            num_layers: 20,
            embedding_dim: 768,
            num_embeddings: 77,
            additional_embeddings: 4,
            dropout: 0.0,
            time_embed_act_fn: "silu".into(),
            norm_in_type: None,
            embedding_proj_norm_type: None,
            encoder_hid_proj_type: Some("linear".into()),
            added_emb_type: Some("prd".into()),
            time_embed_dim: None,
            embedding_proj_dim: None,
            clip_embed_dim: None,
        }
    }
}

impl PriorConfig {
    /// The transformer width.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn time_embed_dim(&self) -> i64 {
        self.time_embed_dim.unwrap_or_else(|| self.inner_dim())
    }

    pub fn embedding_proj_dim(&self) -> i64 {
        self.embedding_proj_dim.unwrap_or(self.embedding_dim)
    }

    /// Length of the transformer's sequence.
    pub fn sequence_length(&self) -> i64 {
        self.num_embeddings + self.additional_embeddings
    }

    /// Errors name the key under `prior.model`.
    /// Variables of the model this config builds (its buffers `clip_mean` / `clip_std`
    /// included, as `--dry-run` counts them), computed without building it.
    pub fn parameter_count(&self) -> i64 {
        let (inner, d) = (self.inner_dim(), self.embedding_dim);
        let linear = |i: i64, o: i64| i * o + o;
        let block = 2 * 2 * inner
            + 4 * linear(inner, inner)
            + linear(inner, 4 * inner)
            + linear(4 * inner, inner);
        let optional_norm = |on: bool, width: i64| if on { 2 * width } else { 0 };
        linear(inner, self.time_embed_dim())
            + linear(self.time_embed_dim(), inner)
            + linear(d, inner)
            + optional_norm(
                self.embedding_proj_norm_type.is_some(),
                self.embedding_proj_dim(),
            )
            + linear(self.embedding_proj_dim(), inner)
            + linear(d, inner)
            + self.sequence_length() * inner
            + inner
            + self.num_layers * block
            + optional_norm(self.norm_in_type.is_some(), inner)
            + 2 * inner
            + linear(inner, d)
            + 2 * d
    }

    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("num_layers", self.num_layers),
            ("embedding_dim", self.embedding_dim),
            ("num_embeddings", self.num_embeddings),
            ("time_embed_dim", self.time_embed_dim()),
            ("embedding_proj_dim", self.embedding_proj_dim()),
        ] {
            ensure!(v > 0, "prior.model.{key} must be positive, got {v}");
        }
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "prior.model.dropout must be in [0, 1), got {}",
            self.dropout
        );
        ensure!(
            self.time_embed_act_fn == "silu",
            "prior.model.time_embed_act_fn: only `silu` is supported, got {:?}",
            self.time_embed_act_fn
        );
        ensure!(
            self.encoder_hid_proj_type.as_deref() == Some("linear"),
            "prior.model.encoder_hid_proj_type must be `linear`: the prior reads the caption's token features"
        );
        ensure!(
            self.added_emb_type.as_deref() == Some("prd"),
            "prior.model.added_emb_type must be `prd`: the final query token carries the prediction"
        );
        ensure!(
            self.additional_embeddings == 4,
            "prior.model.additional_embeddings must be 4 (z_t, timestep, noised z_i, query token), got {}",
            self.additional_embeddings
        );
        if let Some(d) = self.clip_embed_dim {
            ensure!(
                d == self.embedding_dim,
                "prior.model.clip_embed_dim ({d}) must equal embedding_dim ({}): the prediction is denoised again",
                self.embedding_dim
            );
        }
        Ok(())
    }

    /// The shape from a diffusers `PriorTransformer` `config.json` (its `_`-prefixed bookkeeping
    /// keys are ignored).
    pub fn from_diffusers_json(text: &str, source: &str) -> Result<Self> {
        let mut json: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("{source}: not JSON"))?;
        let Some(map) = json.as_object_mut() else {
            bail!("{source}: not a JSON object");
        };
        map.retain(|k, _| !k.starts_with('_'));
        let cfg: Self = serde_json::from_value(json).with_context(|| source.to_string())?;
        cfg.validate().with_context(|| source.to_string())?;
        Ok(cfg)
    }
}
