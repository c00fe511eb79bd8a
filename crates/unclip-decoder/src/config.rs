//! The `decoder.model:` section: the UNet (diffusers `UNet2DConditionModel` names) and the CLIP
//! conditioning (diffusers `UnCLIPTextProjModel` names).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use crate::unet::UNetConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderModelConfig {
    /// Width of CLIP's embeddings and text token features.
    pub clip_embeddings_dim: i64,
    /// Context tokens z_i is projected into (the paper: 4).
    #[serde(default = "four")]
    pub clip_extra_context_tokens: i64,
    pub unet: UNetConfig,
    /// Self-conditioning (Chen et al. 2022): the UNet also takes its own previous estimate of
    /// x_0 as input channels (`unet.in_channels` = 2 × the image's), zeros when there is none.
    #[serde(default, skip_serializing_if = "is_false")]
    pub self_condition: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// Channels of the images the decoder generates (RGB).
pub const IMAGE_CHANNELS: i64 = 3;

fn four() -> i64 {
    4
}

impl DecoderModelConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.clip_embeddings_dim >= 1,
            "decoder.model.clip_embeddings_dim must be positive"
        );
        ensure!(
            self.clip_extra_context_tokens >= 1,
            "decoder.model.clip_extra_context_tokens must be at least 1"
        );
        self.unet
            .validate()
            .map_err(|e| anyhow::anyhow!("decoder.model.{e}"))?;
        let want = IMAGE_CHANNELS * (1 + i64::from(self.self_condition));
        ensure!(
            self.unet.in_channels == want,
            "decoder.model.unet.in_channels is {} but must be {want} with decoder.model.self_condition: {} \
             (the image's {IMAGE_CHANNELS} channels, then as many for the x_0 estimate when self-conditioned)",
            self.unet.in_channels,
            self.self_condition
        );
        Ok(())
    }

    /// Parameters of `text_proj` (the CLIP conditioning), computed without building it.
    pub fn text_proj_parameter_count(&self) -> i64 {
        let (d, temb, ctx) = (
            self.clip_embeddings_dim,
            self.unet.time_embed_dim(),
            self.unet.cross_attention_dim,
        );
        let linear = |i: i64, o: i64| i * o + o;
        d + 2 * linear(d, temb)
            + linear(d, self.clip_extra_context_tokens * ctx)
            + linear(d, ctx)
            + 2 * ctx
    }
}
