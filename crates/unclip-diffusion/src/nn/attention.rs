//! Multi-head attention (Vaswani et al. 2017) on libtorch's `scaled_dot_product_attention`,
//! with a causal mask and a key padding mask. Used self- or cross-attending.

use crate::error::{shape_err, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Which keys each query may attend to.
#[derive(Debug, Default, Clone, Copy)]
pub struct AttentionMask<'a> {
    /// Query i sees keys 0..=i only (self-attention).
    pub causal: bool,
    /// [B, S] bool: true where the key is a real token, false where it is padding.
    pub key_padding: Option<&'a Tensor>,
}

/// Several projections of the same input as one matmul over their concatenated weights — fewer,
/// larger GEMMs than one call per projection; the weights stay separate parameters (and names).
/// `[.., in]` → `[.., Σ out]`.
pub fn fused_linear(input: &Tensor, layers: &[&nn::Linear]) -> Result<Tensor> {
    let ws: Vec<&Tensor> = layers.iter().map(|l| &l.ws).collect();
    let bs: Vec<&Tensor> = layers.iter().filter_map(|l| l.bs.as_ref()).collect();
    let bias = if bs.len() == layers.len() {
        Some(Tensor::f_cat(&bs, 0)?)
    } else if bs.is_empty() {
        None
    } else {
        return Err(shape_err(
            "fused projections",
            "some have a bias and some not".to_string(),
        ));
    };
    Ok(input.f_linear(&Tensor::f_cat(&ws, 0)?, bias.as_ref())?)
}

/// `[B, L, n·heads·head_dim]` (n projections side by side) → n views `[B, heads, L, head_dim]`.
/// unbind rather than n selects: its backward stacks the n gradients in one pass, where each
/// select's would zero-fill a gradient of the full width.
pub fn split_heads(x: &Tensor, n: i64, heads: i64) -> Result<Vec<Tensor>> {
    let size = x.size();
    let (b, l) = (size[0], size[1]);
    let head_dim = size[2] / (n * heads);
    x.f_view([b, l, n, heads, head_dim])?
        .f_unbind(2)?
        .into_iter()
        .map(|t| Ok(t.f_transpose(1, 2)?))
        .collect()
}

/// The keys and values (per head) of the tokens a self-attention layer has seen, for decoding one
/// token at a time without recomputing the prefix. Stored in buffers that grow by doubling, so
/// appending a token copies only the token (not the whole cache, as concatenating would).
#[derive(Debug, Default)]
pub struct KvCache {
    /// [B, heads, capacity, head_dim] each; the first `len` positions are filled.
    kv: Option<(Tensor, Tensor)>,
    /// [B, capacity] bool: true where the cached key is a real token.
    key_padding: Option<Tensor>,
    len: i64,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens cached so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends keys and values [B, heads, L, head_dim] and their padding [B, L]; returns views of
    /// everything cached.
    fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        padding: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (l, start) = (k.size()[2], self.len);
        let needed = start + l;
        let capacity = self.key_padding.as_ref().map_or(0, |p| p.size()[1]);
        if needed > capacity {
            let capacity = needed.max(2 * capacity);
            let grow = |old: Option<&Tensor>, like: &Tensor, dim: usize| -> Result<Tensor> {
                let mut size = like.size();
                size[dim] = capacity;
                let buf = Tensor::f_zeros(size.as_slice(), (like.kind(), like.device()))?;
                if let Some(old) = old {
                    buf.f_narrow(dim as i64, 0, start)?
                        .f_copy_(&old.f_narrow(dim as i64, 0, start)?)?;
                }
                Ok(buf)
            };
            let (ok, ov) = match &self.kv {
                Some((ok, ov)) => (Some(ok), Some(ov)),
                None => (None, None),
            };
            self.kv = Some((grow(ok, k, 2)?, grow(ov, v, 2)?));
            self.key_padding = Some(grow(self.key_padding.as_ref(), padding, 1)?);
        }
        let (Some((ck, cv)), Some(cp)) = (&self.kv, &self.key_padding) else {
            return Err(shape_err("attention cache", "no buffers".to_string()));
        };
        ck.f_narrow(2, start, l)?.f_copy_(k)?;
        cv.f_narrow(2, start, l)?.f_copy_(v)?;
        cp.f_narrow(1, start, l)?.f_copy_(padding)?;
        self.len = needed;
        Ok((
            ck.f_narrow(2, 0, needed)?,
            cv.f_narrow(2, 0, needed)?,
            cp.f_narrow(1, 0, needed)?,
        ))
    }
}

#[derive(Debug)]
pub struct MultiHeadAttention {
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
    dim: i64,
}

impl MultiHeadAttention {
    /// `dim` the query width, `context_dim` the key/value source width (= dim for self-attention).
    /// diffusers' names: `to_q`, `to_k`, `to_v` (with bias), `to_out.0`.
    pub fn new(p: nn::Path, dim: i64, context_dim: i64, heads: i64) -> Result<Self> {
        Self::with_names(
            p,
            dim,
            context_dim,
            heads,
            ["to_q", "to_k", "to_v", "to_out.0"],
        )
    }

    /// The same layer under other projection names, e.g. transformers' CLIP:
    /// `["q_proj", "k_proj", "v_proj", "out_proj"]`. Dots in a name are path separators.
    pub fn with_names(
        p: nn::Path,
        dim: i64,
        context_dim: i64,
        heads: i64,
        names: [&str; 4],
    ) -> Result<Self> {
        if heads <= 0 || dim % heads != 0 {
            return Err(shape_err(
                "attention",
                format!("width {dim} is not divisible by {heads} heads"),
            ));
        }
        let path = |name: &str| name.split('.').fold(p.clone(), |acc, part| &acc / part);
        let cfg = nn::LinearConfig {
            bias: true,
            ..Default::default()
        };
        Ok(Self {
            to_q: nn::linear(path(names[0]), dim, dim, cfg),
            to_k: nn::linear(path(names[1]), context_dim, dim, cfg),
            to_v: nn::linear(path(names[2]), context_dim, dim, cfg),
            to_out: nn::linear(path(names[3]), dim, dim, Default::default()),
            heads,
            dim,
        })
    }

    /// The boolean mask [B, 1, L, S] for SDPA (true = attend), or None when nothing is masked.
    /// Causal: the L queries are the last L of the S positions, query i seeing keys 0..=S − L + i.
    fn build_mask(
        &self,
        mask: &AttentionMask,
        b: i64,
        l: i64,
        s: i64,
        device: tch::Device,
    ) -> Result<Option<Tensor>> {
        let mut out: Option<Tensor> = None;
        if mask.causal {
            out = Some(
                Tensor::ones([l, s], (Kind::Bool, device))
                    .tril(s - l)
                    .view([1, 1, l, s]),
            );
        }
        if let Some(kp) = mask.key_padding {
            if kp.size() != [b, s] {
                return Err(shape_err(
                    "attention key padding mask",
                    format!("expected [{b}, {s}], got {:?}", kp.size()),
                ));
            }
            let kp = kp
                .f_to_kind(Kind::Bool)?
                .f_to_device(device)?
                .f_view([b, 1, 1, s])?;
            out = Some(match out {
                Some(c) => c.logical_and(&kp),
                None => kp,
            });
        }
        Ok(out)
    }

    /// [B, L] of an input that must be [B, L, dim].
    fn check_input(&self, x: &Tensor) -> Result<(i64, i64)> {
        let size = x.size();
        if size.len() != 3 || size[2] != self.dim {
            return Err(shape_err(
                "attention input",
                format!("expected [B, L, {}], got {size:?}", self.dim),
            ));
        }
        Ok((size[0], size[1]))
    }

    /// Scaled dot-product attention of per-head `q` [B, heads, L, head_dim] over `k`, `v`, heads
    /// merged back and projected out: [B, L, dim].
    fn attend(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask: Option<&Tensor>,
        is_causal: bool,
    ) -> Result<Tensor> {
        let (b, l) = (q.size()[0], q.size()[2]);
        let out =
            Tensor::f_scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, None, false)?;
        let out = out.f_transpose(1, 2)?.f_reshape([b, l, self.dim])?;
        Ok(self.to_out.forward(&out))
    }

    /// Self-attention of the next tokens `x` [B, L, dim] over the tokens in `cache` and themselves
    /// (causally among themselves); their keys and values join the cache. `key_padding` [B, L]
    /// marks which new tokens are real (None: all). Equal to [`Self::forward`] with a causal mask
    /// over the whole sequence, one chunk at a time.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        key_padding: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l) = self.check_input(x)?;
        let device = x.device();
        let new_padding = match key_padding {
            Some(kp) if kp.size() != [b, l] => {
                return Err(shape_err(
                    "attention key padding mask",
                    format!("expected [{b}, {l}], got {:?}", kp.size()),
                ))
            }
            Some(kp) => kp.f_to_kind(Kind::Bool)?,
            None => Tensor::ones([b, l], (Kind::Bool, device)),
        };
        if let Some(old) = &cache.key_padding {
            if old.size()[0] != b {
                return Err(shape_err(
                    "attention cache",
                    format!("holds {} rows, the input has {b}", old.size()[0]),
                ));
            }
        }
        let qkv = fused_linear(x, &[&self.to_q, &self.to_k, &self.to_v])?;
        let wrong = |_| shape_err("attention", "projection split".to_string());
        let [q, k, v]: [Tensor; 3] = split_heads(&qkv, 3, self.heads)?
            .try_into()
            .map_err(wrong)?;
        let (k, v, padding) = cache.append(&k, &v, &new_padding)?;
        let mask = AttentionMask {
            causal: true,
            key_padding: Some(&padding),
        };
        let attn_mask = self.build_mask(&mask, b, l, cache.len(), device)?;
        self.attend((&q, &k, &v), attn_mask.as_ref(), false)
    }

    /// x: [B, L, dim]; context: [B, S, context_dim] (None = self-attention). Returns [B, L, dim].
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        mask: AttentionMask,
    ) -> Result<Tensor> {
        let (b, l) = self.check_input(x)?;
        let ctx = context.unwrap_or(x);
        if ctx.dim() != 3 || ctx.size()[0] != b {
            return Err(shape_err(
                "attention context",
                format!("expected [{b}, S, C], got {:?}", ctx.size()),
            ));
        }
        let s = ctx.size()[1];
        if mask.causal && l != s {
            return Err(shape_err(
                "attention",
                format!("a causal mask needs self-attention, got {l} queries and {s} keys"),
            ));
        }
        let parts = |t: Tensor, n: i64| -> Result<Vec<Tensor>> { split_heads(&t, n, self.heads) };
        let wrong = |_| shape_err("attention", "projection split".to_string());
        let (q, k, v) = if context.is_none() {
            let qkv = fused_linear(x, &[&self.to_q, &self.to_k, &self.to_v])?;
            let [q, k, v]: [Tensor; 3] = parts(qkv, 3)?.try_into().map_err(wrong)?;
            (q, k, v)
        } else {
            let kv = fused_linear(ctx, &[&self.to_k, &self.to_v])?;
            let [k, v]: [Tensor; 2] = parts(kv, 2)?.try_into().map_err(wrong)?;
            let [q]: [Tensor; 1] = parts(self.to_q.forward(x), 1)?.try_into().map_err(wrong)?;
            (q, k, v)
        };
        // A plain causal mask goes to SDPA as is_causal, which skips the masked blocks.
        let causal_only = mask.causal && mask.key_padding.is_none() && l == s;
        let attn_mask = if causal_only {
            None
        } else {
            self.build_mask(&mask, b, l, s, x.device())?
        };
        self.attend((&q, &k, &v), attn_mask.as_ref(), causal_only)
    }
}
