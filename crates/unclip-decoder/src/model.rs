//! The decoder as diffusers' UnCLIP pipeline composes it: `text_proj` turns (z_i, z_t, caption
//! token features) into the UNet's context and timestep addition, and `decoder` (the UNet)
//! predicts ε and the variance interpolation from the noised image. Classifier-free guidance
//! drops z_i (to a learned null embedding) and the caption (to the empty caption) independently.

use anyhow::{ensure, Result};
use tch::nn;
use tch::{Kind, Tensor};

use unclip_diffusion::guidance::replace_rows;

use crate::text_proj::TextProj;
use crate::unet::{UNet, UNetConfig};

/// The CLIP conditioning of one batch.
#[derive(Debug)]
pub struct DecoderCondition {
    /// [B, D]: CLIP image embeddings z_i.
    pub image_embeds: Tensor,
    /// [B, D]: CLIP text embeddings z_t.
    pub text_embeds: Tensor,
    /// [B, L, D]: the caption's token features.
    pub tokens: Tensor,
    /// [B, L] bool: real caption tokens.
    pub mask: Tensor,
}

#[derive(Debug)]
pub struct UnclipDecoder {
    pub text_proj: TextProj,
    pub unet: UNet,
    extra_tokens: i64,
}

impl UnclipDecoder {
    /// `text_proj` and `decoder` under `p` (diffusers' pipeline component names);
    /// `clip_dim` is the CLIP embedding (and token feature) width.
    pub fn new(p: nn::Path, unet: &UNetConfig, clip_dim: i64, extra_tokens: i64) -> Result<Self> {
        let unet_model = UNet::new(&p / "decoder", unet)?;
        Ok(Self {
            text_proj: TextProj::new(
                &p / "text_proj",
                clip_dim,
                extra_tokens,
                unet.time_embed_dim(),
                unet.cross_attention_dim,
            ),
            unet: unet_model,
            extra_tokens,
        })
    }

    /// The raw UNet output (ε and variance channels) for noised images `x_t` at training
    /// timesteps `t`.
    pub fn forward_t(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &DecoderCondition,
        train: bool,
    ) -> Result<Tensor> {
        let c = self
            .text_proj
            .forward(&cond.image_embeds, &cond.text_embeds, &cond.tokens)?;
        let b = x_t.size()[0];
        ensure!(
            cond.mask.size() == [b, cond.tokens.size()[1]],
            "decoder conditioning: mask must be [{b}, {}], got {:?}",
            cond.tokens.size()[1],
            cond.mask.size()
        );
        // The extra CLIP tokens are always attended to.
        let extra = Tensor::ones([b, self.extra_tokens], (Kind::Bool, cond.mask.device()));
        let mask = Tensor::f_cat(&[&extra, &cond.mask.to_kind(Kind::Bool)], 1)?;
        self.unet
            .forward_t(x_t, t, &c.time_add, &c.context, Some(&mask), train)
    }

    /// Guidance dropout: rows where `drop_image` [B] is true get the learned null image
    /// embedding; rows where `drop_text` is true get `null_text`'s (one row: z_t, tokens, mask of
    /// the empty caption).
    pub fn drop_conditioning(
        &self,
        cond: &DecoderCondition,
        drop_image: &Tensor,
        drop_text: &Tensor,
        null_text: &DecoderCondition,
    ) -> Result<DecoderCondition> {
        let null_image = self
            .text_proj
            .learned_classifier_free_guidance_embeddings
            .unsqueeze(0);
        Ok(DecoderCondition {
            image_embeds: replace_rows(&cond.image_embeds, &null_image, drop_image)?,
            text_embeds: replace_rows(&cond.text_embeds, &null_text.text_embeds, drop_text)?,
            tokens: replace_rows(&cond.tokens, &null_text.tokens, drop_text)?,
            mask: replace_rows(&cond.mask, &null_text.mask, drop_text)?,
        })
    }
}
