//! The decoder as diffusers' UnCLIP pipeline composes it: `text_proj` turns (z_i, z_t, caption
//! token features) into the UNet's context and timestep addition, and `decoder` (the UNet)
//! predicts ε and the variance interpolation from the noised image. Classifier-free guidance
//! drops z_i (to a learned null embedding) and the caption (to the empty caption) independently.

use anyhow::{ensure, Result};
use tch::nn;
use tch::{Kind, Tensor};

use unclip_clip::caption::TextCondition;
use unclip_diffusion::guidance::replace_rows;

use crate::config::DecoderModelConfig;
use crate::text_proj::TextProj;
use crate::unet::{UNet, UNetConfig};

/// The CLIP conditioning of one batch.
#[derive(Debug)]
pub struct DecoderCondition {
    /// [B, D]: CLIP image embeddings z_i.
    pub image_embeds: Tensor,
    /// z_t [B, D], the caption's token features [B, L, D] and their mask.
    pub text: TextCondition,
}

impl DecoderCondition {
    /// This batch followed by `other`.
    pub fn cat(&self, other: &Self) -> Result<Self> {
        Ok(Self {
            image_embeds: Tensor::f_cat(&[&self.image_embeds, &other.image_embeds], 0)?,
            text: self.text.cat(&other.text)?,
        })
    }

    /// The rows `index` [N] (int64) picks, in its order.
    pub fn index_select(&self, index: &Tensor) -> Result<Self> {
        Ok(Self {
            image_embeds: self.image_embeds.f_index_select(0, index)?,
            text: self.text.index_select(index)?,
        })
    }

    pub fn len(&self) -> i64 {
        self.image_embeds.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
pub struct UnclipDecoder {
    pub text_proj: TextProj,
    pub unet: UNet,
    extra_tokens: i64,
    /// Whether the UNet also takes an x_0 estimate (see [`UnclipDecoder::input`]).
    pub self_condition: bool,
}

impl UnclipDecoder {
    /// `text_proj` and `decoder` under `p` (diffusers' pipeline component names);
    /// `clip_dim` is the CLIP embedding (and token feature) width. Not self-conditioned
    /// (`from_config` builds those).
    pub fn new(p: nn::Path, unet: &UNetConfig, clip_dim: i64, extra_tokens: i64) -> Result<Self> {
        Self::build(p, unet, clip_dim, extra_tokens, false)
    }

    fn build(
        p: nn::Path,
        unet: &UNetConfig,
        clip_dim: i64,
        extra_tokens: i64,
        self_condition: bool,
    ) -> Result<Self> {
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
            self_condition,
        })
    }

    /// The decoder a `decoder.model:` section describes.
    pub fn from_config(p: nn::Path, cfg: &DecoderModelConfig) -> Result<Self> {
        cfg.validate()?;
        Self::build(
            p,
            &cfg.unet,
            cfg.clip_embeddings_dim,
            cfg.clip_extra_context_tokens,
            cfg.self_condition,
        )
    }

    /// The UNet's input for noised images `x_t`: `x_t` itself, or for a self-conditioned decoder
    /// `x_t` followed on the channel axis by the x_0 estimate.
    pub fn input(&self, x_t: &Tensor, estimate: &Tensor) -> Result<Tensor> {
        if !self.self_condition {
            return Ok(x_t.shallow_clone());
        }
        ensure!(
            estimate.size() == x_t.size(),
            "decoder: x_0 estimate {:?} for images {:?}",
            estimate.size(),
            x_t.size()
        );
        Ok(Tensor::f_cat(&[x_t, &estimate.to_kind(x_t.kind())], 1)?)
    }

    /// The raw UNet output (mean and variance channels) for the network input `x_t` (see
    /// [`UnclipDecoder::input`]) at training timesteps `t`.
    pub fn forward_t(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &DecoderCondition,
        train: bool,
    ) -> Result<Tensor> {
        let c = self.text_proj.forward(
            &cond.image_embeds,
            &cond.text.text_embeds,
            &cond.text.tokens,
        )?;
        let b = x_t.size()[0];
        let text_mask = &cond.text.mask;
        ensure!(
            text_mask.size() == [b, cond.text.tokens.size()[1]],
            "decoder conditioning: mask must be [{b}, {}], got {:?}",
            cond.text.tokens.size()[1],
            text_mask.size()
        );
        // The extra CLIP tokens are always attended to.
        let extra = Tensor::ones([b, self.extra_tokens], (Kind::Bool, text_mask.device()));
        let mask = Tensor::f_cat(&[&extra, &text_mask.to_kind(Kind::Bool)], 1)?;
        self.unet
            .forward_t(x_t, t, &c.time_add, &c.context, Some(&mask), train)
    }

    /// Guidance dropout: rows where `drop_image` [B] is true get the learned null image
    /// embedding; rows where `drop_text` is true get `null_text` (one row: z_t, tokens and mask
    /// of the empty caption).
    pub fn drop_conditioning(
        &self,
        cond: &DecoderCondition,
        drop_image: &Tensor,
        drop_text: &Tensor,
        null_text: &TextCondition,
    ) -> Result<DecoderCondition> {
        let null_image = self
            .text_proj
            .learned_classifier_free_guidance_embeddings
            .unsqueeze(0);
        Ok(DecoderCondition {
            image_embeds: replace_rows(&cond.image_embeds, &null_image, drop_image)?,
            text: cond.text.replace_rows(drop_text, null_text)?,
        })
    }

    /// The fully unconditional row classifier-free guidance contrasts with: the learned null
    /// image embedding and the empty caption, `n` times.
    pub fn null_condition(&self, null_text: &TextCondition, n: i64) -> Result<DecoderCondition> {
        let zeros = Tensor::zeros([n], (Kind::Int64, null_text.text_embeds.device()));
        Ok(DecoderCondition {
            image_embeds: self
                .text_proj
                .learned_classifier_free_guidance_embeddings
                .unsqueeze(0)
                .f_index_select(0, &zeros)?,
            text: null_text.index_select(&zeros)?,
        })
    }
}
