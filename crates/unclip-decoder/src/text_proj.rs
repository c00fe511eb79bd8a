//! unCLIP's CLIP conditioning of the decoder (§2.1), as diffusers' `UnCLIPTextProjModel`: z_i and
//! z_t projected and added to the timestep embedding, and z_i projected into extra context tokens
//! put before the (projected, normalised) caption token features.

use anyhow::{ensure, Result};
use tch::nn::{self, Module};
use tch::Tensor;
use unclip_diffusion::nn::init;

#[derive(Debug)]
pub struct TextProj {
    /// The null image embedding classifier-free guidance substitutes (learned).
    pub learned_classifier_free_guidance_embeddings: Tensor,
    embedding_proj: nn::Linear,
    clip_image_embeddings_project_to_time_embeddings: nn::Linear,
    clip_extra_context_tokens_proj: nn::Linear,
    encoder_hidden_states_proj: nn::Linear,
    text_encoder_hidden_states_norm: nn::LayerNorm,
    extra_tokens: i64,
    clip_dim: i64,
    context_dim: i64,
}

/// What the UNet receives.
#[derive(Debug)]
pub struct ClipConditioning {
    /// [B, extra_tokens + L, context_dim]: extra tokens first, then the caption's.
    pub context: Tensor,
    /// [B, time_embed_dim]: added to the timestep embedding.
    pub time_add: Tensor,
}

impl TextProj {
    pub fn new(
        p: nn::Path,
        clip_dim: i64,
        extra_tokens: i64,
        time_embed_dim: i64,
        context_dim: i64,
    ) -> Self {
        let linear = |name: &str, o: i64| init::linear(&p / name, clip_dim, o);
        Self {
            learned_classifier_free_guidance_embeddings: p
                .zeros("learned_classifier_free_guidance_embeddings", &[clip_dim]),
            embedding_proj: linear("embedding_proj", time_embed_dim),
            clip_image_embeddings_project_to_time_embeddings: linear(
                "clip_image_embeddings_project_to_time_embeddings",
                time_embed_dim,
            ),
            clip_extra_context_tokens_proj: linear(
                "clip_extra_context_tokens_proj",
                extra_tokens * context_dim,
            ),
            encoder_hidden_states_proj: linear("encoder_hidden_states_proj", context_dim),
            text_encoder_hidden_states_norm: nn::layer_norm(
                &p / "text_encoder_hidden_states_norm",
                vec![context_dim],
                Default::default(),
            ),
            extra_tokens,
            clip_dim,
            context_dim,
        }
    }

    /// z_i, z_t: [B, clip_dim]; tokens: [B, L, clip_dim] caption token features.
    pub fn forward(
        &self,
        image_embeds: &Tensor,
        text_embeds: &Tensor,
        tokens: &Tensor,
    ) -> Result<ClipConditioning> {
        let b = image_embeds.size()[0];
        ensure!(
            image_embeds.size() == [b, self.clip_dim] && text_embeds.size() == [b, self.clip_dim],
            "decoder conditioning: z_i and z_t must be [B, {}], got {:?} and {:?}",
            self.clip_dim,
            image_embeds.size(),
            text_embeds.size()
        );
        ensure!(
            tokens.dim() == 3 && tokens.size()[0] == b && tokens.size()[2] == self.clip_dim,
            "decoder conditioning: token features must be [{b}, L, {}], got {:?}",
            self.clip_dim,
            tokens.size()
        );
        let time_add = self.embedding_proj.forward(text_embeds)
            + self
                .clip_image_embeddings_project_to_time_embeddings
                .forward(image_embeds);
        // diffusers lays the projection out channel-major: [B, context_dim, extra] → [B, extra, context_dim].
        let extra = self
            .clip_extra_context_tokens_proj
            .forward(image_embeds)
            .f_reshape([b, self.context_dim, self.extra_tokens])?
            .f_permute([0, 2, 1])?;
        let text = self
            .text_encoder_hidden_states_norm
            .forward(&self.encoder_hidden_states_proj.forward(tokens));
        Ok(ClipConditioning {
            context: Tensor::f_cat(&[extra, text], 1)?,
            time_add,
        })
    }
}
