//! The `upsampler.model:` section: diffusers' `UNet2DModel` as the UnCLIP pipeline's
//! super-resolution stages configure it (same key names; the rest fixed: ResBlocks that resample
//! inside the block, no attention anywhere, 3 noisy + 3 low-resolution input channels).

use anyhow::{anyhow, ensure, Result};
use serde::{Deserialize, Serialize};
use unclip_decoder::UNetConfig;
use unclip_diffusion::nn::resnet::TimeScaleShift;

/// RGB.
pub const IMAGE_CHANNELS: i64 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsamplerModelConfig {
    /// 6 with a learned variance (`diffusion.variance: learned_range`), else 3.
    #[serde(default = "six")]
    pub out_channels: i64,
    /// Channels per resolution level, top first (the paper gives the base: 320 for 64→256, 192
    /// for 256→1024).
    pub block_out_channels: Vec<i64>,
    /// ResBlocks per level (the paper: 3 for 64→256, 2 for 256→1024).
    #[serde(default = "three")]
    pub layers_per_block: i64,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: i64,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub dropout: f64,
    /// How the ResBlocks take the timestep embedding: `scale_shift` (ADM's, the default here) or
    /// `default` (added after the first conv: diffusers' default, Karlo's super-resolution UNets).
    #[serde(default)]
    pub resnet_time_scale_shift: TimeScaleShift,
}

fn six() -> i64 {
    6
}
fn three() -> i64 {
    3
}
fn thirty_two() -> i64 {
    32
}
fn norm_eps() -> f64 {
    1e-5
}

impl UpsamplerModelConfig {
    /// The input: the noisy image and the upsampled low-resolution one.
    pub fn in_channels(&self) -> i64 {
        2 * IMAGE_CHANNELS
    }

    /// The attention-free UNet this describes, in the decoder UNet's terms.
    pub fn unet(&self) -> UNetConfig {
        let n = self.block_out_channels.len();
        UNetConfig {
            in_channels: self.in_channels(),
            out_channels: self.out_channels,
            block_out_channels: self.block_out_channels.clone(),
            down_block_types: vec!["ResnetDownsampleBlock2D".into(); n],
            up_block_types: vec!["ResnetUpsampleBlock2D".into(); n],
            layers_per_block: self.layers_per_block,
            // No attention: unused.
            cross_attention_dim: 1,
            attention_head_dim: 1,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            dropout: self.dropout,
            time_scale_shift: self.resnet_time_scale_shift,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.out_channels == IMAGE_CHANNELS || self.out_channels == 2 * IMAGE_CHANNELS,
            "upsampler.model.out_channels must be 3 (fixed variance) or 6 (learned), got {}",
            self.out_channels
        );
        ensure!(
            self.norm_num_groups >= 1,
            "upsampler.model.norm_num_groups must be positive"
        );
        ensure!(
            self.norm_eps > 0.0,
            "upsampler.model.norm_eps must be positive"
        );
        self.unet().validate_with(false).map_err(|e| {
            anyhow!(
                "upsampler.model: {}",
                e.to_string().trim_start_matches("unet.")
            )
        })
    }

    /// How many parameters the UNet has, computed without building it.
    pub fn parameter_count(&self) -> i64 {
        self.unet().parameter_count_with(false)
    }

    /// Levels below the top: the image side must be a multiple of 2^this.
    pub fn downsamplings(&self) -> u32 {
        self.block_out_channels.len().saturating_sub(1) as u32
    }
}
