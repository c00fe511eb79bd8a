//! Caption conditioning shared by the prior and the decoder: z_t, the text encoder's per-token
//! features and their mask, from captions through the frozen CLIP text encoder or from the token
//! features `embed --token-features` stores in the embedding shards.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use unclip_data::embeddings::{ClipEmbeddings, EmbeddingSample};
use unclip_data::tokenizer::ClipTokenizer;
use unclip_diffusion::guidance::replace_rows;

use crate::load::{load_clip, LoadedClip};

/// The caption side of a conditioning batch.
#[derive(Debug)]
pub struct TextCondition {
    /// [B, D]: the CLIP text embedding z_t.
    pub text_embeds: Tensor,
    /// [B, L, W]: the text encoder's final per-token features.
    pub tokens: Tensor,
    /// [B, L] bool: true for real tokens (up to and including the end token).
    pub mask: Tensor,
}

impl TextCondition {
    /// Rows `index` (a [N] int64 tensor) of every part.
    pub fn index_select(&self, index: &Tensor) -> Result<Self> {
        let index = index.to_device(self.text_embeds.device());
        Ok(Self {
            text_embeds: self.text_embeds.f_index_select(0, &index)?,
            tokens: self.tokens.f_index_select(0, &index)?,
            mask: self.mask.f_index_select(0, &index)?,
        })
    }

    /// This batch followed by `other` (same widths).
    pub fn cat(&self, other: &Self) -> Result<Self> {
        Ok(Self {
            text_embeds: Tensor::f_cat(&[&self.text_embeds, &other.text_embeds], 0)?,
            tokens: Tensor::f_cat(&[&self.tokens, &other.tokens], 0)?,
            mask: Tensor::f_cat(&[&self.mask, &other.mask], 0)?,
        })
    }

    /// Per row, `other`'s row where `take_other` [B] bool is true (guidance dropout).
    pub fn replace_rows(&self, take_other: &Tensor, other: &Self) -> Result<Self> {
        Ok(Self {
            text_embeds: replace_rows(&self.text_embeds, &other.text_embeds, take_other)?,
            tokens: replace_rows(&self.tokens, &other.tokens, take_other)?,
            mask: replace_rows(&self.mask, &other.mask, take_other)?,
        })
    }

    pub fn len(&self) -> i64 {
        self.text_embeds.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The frozen CLIP text encoder and its tokenizer.
pub struct CaptionEncoder {
    pub clip: LoadedClip,
    tokenizer: ClipTokenizer,
}

impl CaptionEncoder {
    /// CLIP from a `train-clip` run directory or a Hugging Face CLIP directory.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        Ok(Self {
            clip: load_clip(path, device)?,
            tokenizer: ClipTokenizer::new(),
        })
    }

    pub fn context_length(&self) -> i64 {
        self.clip.model.cfg.text.context_length
    }

    pub fn text_width(&self) -> i64 {
        self.clip.model.cfg.text.width
    }

    pub fn embed_dim(&self) -> i64 {
        self.clip.model.cfg.embed_dim
    }

    /// The encoder of the CLIP at `path` handing out z_t and z_i as `embeddings` says.
    pub fn load_with(path: &Path, device: Device, embeddings: ClipEmbeddings) -> Result<Self> {
        let mut encoder = Self::load(path, device)?;
        encoder.clip.embeddings = embeddings;
        Ok(encoder)
    }

    /// z_t (L2-normalised or raw, as the CLIP's [`LoadedClip::embeddings`] says), the token
    /// features and their mask.
    pub fn encode<S: AsRef<str>>(&self, captions: &[S]) -> Result<TextCondition> {
        let ctx = self.context_length();
        let device = self.clip.vs.device();
        let ids = Tensor::from_slice(&self.tokenizer.tokenize_batch(captions, ctx as usize))
            .view([captions.len() as i64, ctx])
            .to_device(device);
        let _g = tch::no_grad_guard();
        let text = self.clip.model.encode_text(&ids)?;
        // The end token has the largest id, so argmax finds it; it and everything before it count.
        let end = ids.argmax(-1, true);
        let mask = Tensor::arange(ctx, (Kind::Int64, device))
            .unsqueeze(0)
            .le_tensor(&end);
        Ok(TextCondition {
            text_embeds: self.clip.convention(&text.embeds)?,
            tokens: text.tokens,
            mask,
        })
    }

    /// The null condition classifier-free guidance uses: the empty caption, as diffusers'
    /// UnCLIP pipeline encodes it.
    pub fn null_condition(&self) -> Result<TextCondition> {
        self.encode(&[""])
    }
}

/// The stored image embeddings z_i of embedding samples as one [N, D] tensor on `device`.
pub fn image_embeddings(samples: &[EmbeddingSample], device: Device) -> Tensor {
    stack(samples, |s| &s.image_emb, device)
}

/// The stored text embeddings z_t of embedding samples as one [N, D] tensor on `device`.
pub fn text_embeddings(samples: &[EmbeddingSample], device: Device) -> Tensor {
    stack(samples, |s| &s.text_emb, device)
}

fn stack(
    samples: &[EmbeddingSample],
    row: impl Fn(&EmbeddingSample) -> &[f32],
    device: Device,
) -> Tensor {
    let flat: Vec<f32> = samples
        .iter()
        .flat_map(|s| row(s).iter().copied())
        .collect();
    Tensor::from_slice(&flat)
        .view([samples.len() as i64, -1])
        .to_device(device)
}

/// z_t from the shards and their stored token features, padded to `context_length`. A sample
/// without token features is an error naming its key (run `embed --token-features`).
pub fn stored_condition(
    samples: &[EmbeddingSample],
    context_length: i64,
    width: i64,
    device: Device,
) -> Result<TextCondition> {
    let b = samples.len() as i64;
    let ctx = context_length as usize;
    let w = width as usize;
    let mut tokens = vec![0f32; samples.len() * ctx * w];
    let mut lengths = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        let t = s.text_tokens.as_ref().with_context(|| {
            format!(
                "embedding sample {:?} has no txt_tokens.npy: write the shards with `embed --token-features` or set data.text_features: clip",
                s.key
            )
        })?;
        ensure!(
            t.shape.len() == 2 && t.shape[1] == w && (1..=ctx).contains(&t.shape[0]),
            "embedding sample {:?}: token features of shape {:?}, expected [1..={ctx}, {w}]",
            s.key,
            t.shape
        );
        let values = t.to_f32();
        tokens[i * ctx * w..i * ctx * w + values.len()].copy_from_slice(&values);
        lengths.push(t.shape[0] as i64);
    }
    let lengths = Tensor::from_slice(&lengths).to_device(device);
    let mask = Tensor::arange(context_length, (Kind::Int64, device))
        .unsqueeze(0)
        .lt_tensor(&lengths.unsqueeze(1));
    Ok(TextCondition {
        text_embeds: text_embeddings(samples, device),
        tokens: Tensor::from_slice(&tokens)
            .view([b, context_length, width])
            .to_device(device),
        mask,
    })
}
