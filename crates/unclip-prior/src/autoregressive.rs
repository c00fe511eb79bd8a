//! unCLIP's autoregressive prior (Ramesh et al. 2022, §2.2): z_i as a sequence of discrete codes —
//! its first principal components, each quantised ([`EmbeddingCodec`]) — predicted one at a time
//! by a causal transformer after a conditioning prefix: the caption's token features (through an
//! optional caption encoder), z_t, and the quantised z_i · z_t. Sampling conditions the last on a
//! high quantile of the training dot products, which gives embeddings closer to the caption — or,
//! ours, draws it from the model, which also learns to predict it from the text.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};
use unclip_diffusion::nn::{AttentionMask, KvCache, TransformerBlock};

use crate::codec::EmbeddingCodec;
use crate::model::TextCondition;
use crate::sample::{check_guidance, repeat_candidates, rerank, with_null_rows, PriorSamples};

/// The `prior.autoregressive` section: the transformer, the codec and how it samples.
/// Defaults are the paper's (SPEC.md: 319 of 1024 components, 1024 buckets, a 24 × 2048 caption
/// encoder and a 24 × 1664 causal decoder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArPriorConfig {
    pub num_attention_heads: i64,
    pub attention_head_dim: i64,
    /// Blocks of the causal decoder.
    pub num_layers: i64,
    /// Blocks of the caption encoder (bidirectional, over the CLIP token features) before the
    /// decoder; 0: the token features are only projected.
    pub text_layers: i64,
    /// The caption encoder's width (left out: the paper's 2048; null: the decoder's); its heads are
    /// `attention_head_dim` wide.
    pub text_width: Option<i64>,
    /// CLIP embedding width: z_i, z_t and the caption token features.
    pub embedding_dim: i64,
    /// Caption tokens (the CLIP text encoder's context length).
    pub num_embeddings: i64,
    /// Principal components of z_i kept (the predicted sequence's length).
    pub components: i64,
    /// Buckets per component.
    pub buckets: i64,
    /// The buckets span ±range standard deviations of each component.
    pub range: f64,
    /// Buckets of z_i · z_t (equal-mass bands of the training distribution).
    pub dot_buckets: i64,
    /// Sampling conditions on this quantile band of the training z_i · z_t (the paper's way to
    /// embeddings closer to the caption); null: on a band drawn from the model's own prediction
    /// of it given the text.
    pub dot_quantile: Option<f64>,
    /// Sampling temperature of each code.
    pub temperature: f64,
}

impl Default for ArPriorConfig {
    fn default() -> Self {
        Self {
            num_attention_heads: 26,
            attention_head_dim: 64,
            num_layers: 24,
            text_layers: 24,
            text_width: Some(2048),
            embedding_dim: 1024,
            num_embeddings: 77,
            components: 319,
            buckets: 1024,
            range: 4.0,
            dot_buckets: 1024,
            dot_quantile: Some(0.9),
            temperature: 1.0,
        }
    }
}

/// How the autoregressive prior samples: the config's `temperature` and `dot_quantile`, or
/// other values for one call (`sample --prior-sampling`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArSampling {
    pub temperature: f64,
    pub dot_quantile: Option<f64>,
}

impl ArSampling {
    /// Errors name the key under `prior.autoregressive`.
    pub fn validate(&self) -> Result<()> {
        if let Some(q) = self.dot_quantile {
            ensure!(
                (0.0..=1.0).contains(&q),
                "prior.autoregressive.dot_quantile must be in [0, 1] (or null), got {q}"
            );
        }
        ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "prior.autoregressive.temperature must be positive, got {}",
            self.temperature
        );
        Ok(())
    }
}

impl ArPriorConfig {
    /// The sampling settings of the config.
    pub fn sampling(&self) -> ArSampling {
        ArSampling {
            temperature: self.temperature,
            dot_quantile: self.dot_quantile,
        }
    }

    /// The decoder's width.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn text_width(&self) -> i64 {
        self.text_width.unwrap_or_else(|| self.inner_dim())
    }

    /// Caption tokens, z_t and the dot token.
    pub fn prefix_length(&self) -> i64 {
        self.num_embeddings + 2
    }

    /// The decoder's input: the prefix and every code but the last.
    pub fn sequence_length(&self) -> i64 {
        self.prefix_length() + self.components - 1
    }

    /// Errors name the key under `prior.autoregressive`.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("num_layers", self.num_layers),
            ("text_width", self.text_width()),
            ("embedding_dim", self.embedding_dim),
            ("num_embeddings", self.num_embeddings),
            ("components", self.components),
            ("buckets", self.buckets),
        ] {
            ensure!(
                v > 0,
                "prior.autoregressive.{key} must be positive, got {v}"
            );
        }
        ensure!(
            self.text_layers >= 0,
            "prior.autoregressive.text_layers must be >= 0, got {}",
            self.text_layers
        );
        ensure!(
            self.text_width() % self.attention_head_dim == 0,
            "prior.autoregressive.text_width ({}) must be a multiple of attention_head_dim ({})",
            self.text_width(),
            self.attention_head_dim
        );
        ensure!(
            self.components <= self.embedding_dim,
            "prior.autoregressive.components ({}) cannot exceed embedding_dim ({})",
            self.components,
            self.embedding_dim
        );
        ensure!(
            self.dot_buckets >= 2,
            "prior.autoregressive.dot_buckets must be at least 2, got {}",
            self.dot_buckets
        );
        ensure!(
            self.range.is_finite() && self.range > 0.0,
            "prior.autoregressive.range must be positive, got {}",
            self.range
        );
        self.sampling().validate()
    }

    /// Variables of the model this config builds (the codec's included), without building it.
    pub fn parameter_count(&self) -> i64 {
        let (w, tw, d) = (self.inner_dim(), self.text_width(), self.embedding_dim);
        let linear = |i: i64, o: i64| i * o + o;
        let block = |w: i64| 12 * w * w + 13 * w;
        let text = if self.text_layers > 0 {
            linear(d, tw) + self.text_layers * block(tw) + 2 * tw + linear(tw, w)
        } else {
            linear(d, w)
        };
        text + linear(d, w)
            + (self.dot_buckets + 1) * w
            + self.buckets * w
            + self.sequence_length() * w
            + self.num_layers * block(w)
            + 2 * w
            + linear(w, self.buckets)
            + linear(w, self.dot_buckets)
            + EmbeddingCodec::variable_count(d, self.components, self.dot_buckets)
    }
}

/// The caption encoder: a projection, then (optionally) bidirectional blocks, a norm and a
/// projection to the decoder's width.
#[derive(Debug)]
struct CaptionEncoder {
    text_in: nn::Linear,
    blocks: Vec<TransformerBlock>,
    out: Option<(nn::LayerNorm, nn::Linear)>,
}

#[derive(Debug)]
pub struct AutoregressivePrior {
    caption: CaptionEncoder,
    text_embed_proj: nn::Linear,
    /// [dot_buckets + 1, W]: the last row is the null dot token of guidance dropout.
    dot_embedding: Tensor,
    /// [buckets, W], shared by every component (the position tells which).
    token_embedding: Tensor,
    positional_embedding: Tensor,
    blocks: Vec<TransformerBlock>,
    norm_out: nn::LayerNorm,
    to_logits: nn::Linear,
    /// Predicts the dot band from the output at z_t.
    dot_head: nn::Linear,
    pub codec: EmbeddingCodec,
    pub cfg: ArPriorConfig,
}

impl AutoregressivePrior {
    pub fn new(p: nn::Path, cfg: &ArPriorConfig) -> Result<Self> {
        cfg.validate()?;
        let (w, tw, d) = (cfg.inner_dim(), cfg.text_width(), cfg.embedding_dim);
        let lin = Default::default();
        let ln = nn::LayerNormConfig::default();
        let emb = |name: &str, rows: i64| {
            p.var(
                name,
                &[rows, w],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
        };
        let blocks = |path: nn::Path, n: i64, width: i64| {
            (0..n)
                .map(|i| {
                    Ok(TransformerBlock::new(
                        &path / i,
                        width,
                        width / cfg.attention_head_dim,
                        4,
                    )?)
                })
                .collect::<Result<Vec<_>>>()
        };
        let caption = if cfg.text_layers > 0 {
            CaptionEncoder {
                text_in: nn::linear(&p / "text_in", d, tw, lin),
                blocks: blocks(&p / "text_blocks", cfg.text_layers, tw)?,
                out: Some((
                    nn::layer_norm(&p / "text_norm", vec![tw], ln),
                    nn::linear(&p / "text_out", tw, w, lin),
                )),
            }
        } else {
            CaptionEncoder {
                text_in: nn::linear(&p / "text_in", d, w, lin),
                blocks: Vec::new(),
                out: None,
            }
        };
        Ok(Self {
            caption,
            text_embed_proj: nn::linear(&p / "text_embed_proj", d, w, lin),
            dot_embedding: emb("dot_embedding", cfg.dot_buckets + 1),
            token_embedding: emb("token_embedding", cfg.buckets),
            positional_embedding: emb("positional_embedding", cfg.sequence_length()),
            blocks: blocks(&p / "blocks", cfg.num_layers, w)?,
            norm_out: nn::layer_norm(&p / "norm_out", vec![w], ln),
            to_logits: nn::linear(&p / "to_logits", w, cfg.buckets, lin),
            dot_head: nn::linear(&p / "dot_head", w, cfg.dot_buckets, lin),
            codec: EmbeddingCodec::new(
                &p / "codec",
                d,
                cfg.components,
                cfg.buckets,
                cfg.range,
                cfg.dot_buckets,
            ),
            cfg: cfg.clone(),
        })
    }

    /// The dot token guidance dropout uses.
    pub fn null_dot(&self) -> i64 {
        self.cfg.dot_buckets
    }

    fn check_text(&self, text: &TextCondition) -> Result<i64> {
        let c = &self.cfg;
        let b = text.len();
        ensure!(
            text.tokens.size() == [b, c.num_embeddings, c.embedding_dim]
                && text.mask.size() == [b, c.num_embeddings]
                && text.text_embeds.size() == [b, c.embedding_dim],
            "autoregressive prior input: caption features [B, {}, {}], mask [B, {}] and z_t [B, {}] \
             expected, got {:?}, {:?} and {:?}",
            c.num_embeddings,
            c.embedding_dim,
            c.num_embeddings,
            c.embedding_dim,
            text.tokens.size(),
            text.mask.size(),
            text.text_embeds.size()
        );
        Ok(b)
    }

    /// The text prefix [B, L + 1, W] — the caption, then z_t — with positions, and its key
    /// padding [B, L + 1].
    fn text_prefix(&self, text: &TextCondition) -> Result<(Tensor, Tensor)> {
        let b = self.check_text(text)?;
        let mask = text.mask.to_kind(Kind::Bool);
        let mut h = self.caption.text_in.forward(&text.tokens);
        for block in &self.caption.blocks {
            h = block.forward(
                &h,
                AttentionMask {
                    causal: false,
                    key_padding: Some(&mask),
                },
            )?;
        }
        if let Some((norm, proj)) = &self.caption.out {
            h = proj.forward(&norm.forward(&h));
        }
        let n = self.cfg.num_embeddings + 1;
        let prefix = Tensor::f_cat(
            &[
                h,
                self.text_embed_proj.forward(&text.text_embeds).unsqueeze(1),
            ],
            1,
        )? + self.positional_embedding.narrow(0, 0, n);
        let z_t = Tensor::ones([b, 1], (Kind::Bool, mask.device()));
        Ok((prefix, Tensor::f_cat(&[&mask, &z_t], 1)?))
    }

    /// Embeddings [B, n, W] of tokens `ids` [B, n] of `table` at positions `start..start + n`.
    fn embed(&self, table: &Tensor, ids: &Tensor, start: i64) -> Tensor {
        let (b, n) = (ids.size()[0], ids.size()[1]);
        table.index_select(0, &ids.reshape([-1])).view([b, n, -1])
            + self.positional_embedding.narrow(0, start, n)
    }

    /// Teacher-forced logits: of the dot band given the text ([B, dot_buckets], read at z_t) and
    /// of every code given the text, the dot token and the codes before it ([B, K, buckets]).
    /// `dot` [B] are dot tokens (or [`Self::null_dot`]), `codes` [B, K] the targets.
    pub fn forward(
        &self,
        text: &TextCondition,
        dot: &Tensor,
        codes: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (prefix, padding) = self.text_prefix(text)?;
        let (b, k, p) = (
            prefix.size()[0],
            self.cfg.components,
            self.cfg.prefix_length(),
        );
        ensure!(
            dot.size() == [b] && codes.size() == [b, k],
            "autoregressive prior input: dot tokens [{b}] and codes [{b}, {k}] expected, got {:?} and {:?}",
            dot.size(),
            codes.size()
        );
        let mut h = Tensor::f_cat(
            &[
                prefix,
                self.embed(&self.dot_embedding, &dot.unsqueeze(1), p - 1),
                self.embed(&self.token_embedding, &codes.narrow(1, 0, k - 1), p),
            ],
            1,
        )?;
        let ones = Tensor::ones([b, k], (Kind::Bool, padding.device()));
        let key_padding = Tensor::f_cat(&[&padding, &ones], 1)?;
        for block in &self.blocks {
            h = block.forward(
                &h,
                AttentionMask {
                    causal: true,
                    key_padding: Some(&key_padding),
                },
            )?;
        }
        let h = self.norm_out.forward(&h.narrow(1, p - 2, k + 1));
        Ok((
            self.dot_head.forward(&h.select(1, 0)),
            self.to_logits.forward(&h.narrow(1, 1, k)),
        ))
    }

    /// Per-sample cross-entropies [B] in nats: of the codes (per code) and of the dot band.
    /// `dot_target` is the band predicted; `dot` the token fed (the null one where the text was
    /// dropped).
    pub fn loss(
        &self,
        text: &TextCondition,
        dot_target: &Tensor,
        dot: &Tensor,
        codes: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (dot_logits, code_logits) = self.forward(text, dot, codes)?;
        let nll = |logits: Tensor, target: &Tensor| {
            logits
                .to_kind(Kind::Float)
                .log_softmax(-1, Kind::Float)
                .gather(-1, &target.unsqueeze(-1), false)
                .squeeze_dim(-1)
                .neg()
        };
        Ok((
            nll(code_logits, codes).mean_dim(1, false, Kind::Float),
            nll(dot_logits, dot_target),
        ))
    }

    /// Runs `x` (the next tokens, positions added) through the decoder's caches; the last
    /// token's normalised output.
    fn step(&self, x: Tensor, caches: &mut [KvCache], padding: Option<&Tensor>) -> Result<Tensor> {
        let mut h = x;
        for (block, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            h = block.forward_cached(&h, cache, padding)?;
        }
        Ok(self.norm_out.forward(&h.select(1, -1)))
    }

    /// Image embeddings for `text` ([B] rows): `candidates` draws per caption — the dot band as
    /// `sampling.dot_quantile` says (or drawn from the model), then the codes — decoded and
    /// reranked by z_i · z_t. `null` is the one-row null condition guidance contrasts with;
    /// `guidance_scale` 1 is unguided. Uses libtorch's global generator.
    pub fn sample(
        &self,
        text: &TextCondition,
        null: &TextCondition,
        guidance_scale: f64,
        candidates: usize,
        sampling: &ArSampling,
    ) -> Result<PriorSamples> {
        sampling.validate()?;
        let _g = tch::no_grad_guard();
        let (b, n) = (text.len(), candidates as i64);
        let device = text.text_embeds.device();
        let cond = repeat_candidates(text, candidates)?;
        let dot = sampling.dot_quantile.map(|q| {
            Tensor::full(
                [b * n],
                self.codec.dot_token_at_quantile(q),
                (Kind::Int64, device),
            )
        });
        let (_, codes) = self.sample_codes(
            &cond,
            dot.as_ref(),
            null,
            guidance_scale,
            sampling.temperature,
        )?;
        let z = self.codec.decode(&codes)?;
        rerank(&z, &cond.text_embeds, b, n)
    }

    /// The dot tokens [B] and codes [B, K] for `text` [B rows], one token at a time through
    /// the KV caches: the dot tokens are `dot` when given, else drawn from the model's
    /// prediction. Guidance contrasts with `null` (one row) and the null dot token, mixing
    /// log-probabilities; `temperature` then divides them.
    pub fn sample_codes(
        &self,
        text: &TextCondition,
        dot: Option<&Tensor>,
        null: &TextCondition,
        guidance_scale: f64,
        temperature: f64,
    ) -> Result<(Tensor, Tensor)> {
        check_guidance(guidance_scale, null)?;
        let _g = tch::no_grad_guard();
        let m = text.len();
        if let Some(dot) = dot {
            ensure!(
                dot.size() == [m],
                "dot tokens must be [{m}], got {:?}",
                dot.size()
            );
        }
        let device = text.text_embeds.device();
        let guided = guidance_scale != 1.0;
        let (prefix, padding) = if guided {
            self.text_prefix(&with_null_rows(text, null)?)?
        } else {
            self.text_prefix(text)?
        };
        // Guided log-probabilities over the conditional rows, tempered, then one draw each.
        let draw = |logits: Tensor| -> Tensor {
            let logp = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
            let logp = if guided {
                let (c, u) = (logp.narrow(0, 0, m), logp.narrow(0, m, m));
                &u + (c - &u) * guidance_scale
            } else {
                logp
            };
            (logp / temperature)
                .softmax(-1, Kind::Float)
                .multinomial(1, true)
                .squeeze_dim(1)
        };
        // Both halves are fed the conditional draw, except the dot token: the null one for the
        // unconditional half, as in training.
        let feed = |tokens: &Tensor| -> Tensor {
            if guided {
                Tensor::cat(&[tokens, tokens], 0)
            } else {
                tokens.shallow_clone()
            }
        };
        let mut caches: Vec<KvCache> = self.blocks.iter().map(|_| KvCache::new()).collect();
        let h = self.step(prefix, &mut caches, Some(&padding))?;
        let dot = match dot {
            Some(d) => d.shallow_clone(),
            None => draw(self.dot_head.forward(&h)),
        };
        let fed_dot = if guided {
            let null_dot = Tensor::full([m], self.null_dot(), (Kind::Int64, device));
            Tensor::cat(&[&dot, &null_dot], 0)
        } else {
            dot.shallow_clone()
        };
        let (k, p) = (self.cfg.components, self.cfg.prefix_length());
        let mut h = self.step(
            self.embed(&self.dot_embedding, &fed_dot.unsqueeze(1), p - 1),
            &mut caches,
            None,
        )?;
        let mut codes = Vec::with_capacity(k as usize);
        for i in 0..k {
            let code = draw(self.to_logits.forward(&h));
            if i + 1 < k {
                let x = self.embed(&self.token_embedding, &feed(&code).unsqueeze(1), p + i);
                h = self.step(x, &mut caches, None)?;
            }
            codes.push(code);
        }
        Ok((dot, Tensor::stack(&codes, 1)))
    }
}
