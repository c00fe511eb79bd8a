//! CLIP's shape: `model:` in `configs/*/clip.yaml`. Field meanings follow transformers'
//! `CLIPVisionConfig` / `CLIPTextConfig`, so a Hugging Face checkpoint's config maps field by field.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// x·σ(1.702x): OpenAI's CLIP and every checkpoint derived from it.
    QuickGelu,
    /// Exact (erf) GELU: open_clip's LAION models.
    Gelu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    pub image_size: i64,
    /// ViT: the patch side. Absent (0) for the ResNet.
    #[serde(default)]
    pub patch_size: i64,
    /// ViT: width of the tokens. ResNet: the base width (stem output; stage i has width·2^i planes).
    pub width: i64,
    /// ViT: transformer blocks. Absent (0) for the ResNet.
    #[serde(default)]
    pub layers: i64,
    /// ViT: attention heads per block. ResNet: heads of the attention pool.
    pub heads: i64,
    /// ViT: MLP hidden width; 4 × width when absent.
    #[serde(default)]
    pub mlp_width: Option<i64>,
    /// Bottleneck blocks per stage of CLIP's ResNet (`ModifiedResNet`, e.g. [3, 4, 6, 3] for RN50);
    /// set, the image tower is that ResNet instead of a ViT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resnet_layers: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: i64,
    #[serde(default = "default_context")]
    pub context_length: i64,
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    #[serde(default)]
    pub mlp_width: Option<i64>,
}

fn default_vocab() -> i64 {
    49_408
}
fn default_context() -> i64 {
    77
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipConfig {
    /// Width of the joint embedding space.
    pub embed_dim: i64,
    pub vision: VisionConfig,
    pub text: TextConfig,
    #[serde(default = "default_activation")]
    pub activation: Activation,
    /// Initial log of the inverse temperature: ln(1/0.07) as in CLIP.
    #[serde(default = "default_logit_scale")]
    pub logit_scale_init: f64,
    /// The temperature is clamped so the scale never exceeds this (100 in CLIP).
    #[serde(default = "default_logit_scale_max")]
    pub logit_scale_max: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_activation() -> Activation {
    Activation::QuickGelu
}
fn default_logit_scale() -> f64 {
    (1.0f64 / 0.07).ln()
}
fn default_logit_scale_max() -> f64 {
    100.0
}
fn default_eps() -> f64 {
    1e-5
}

impl VisionConfig {
    pub fn is_resnet(&self) -> bool {
        !self.resnet_layers.is_empty()
    }
    /// The ResNet's total stride: 4 in the stem, 2 in each stage after the first.
    pub fn resnet_downsampling(&self) -> i64 {
        4 << (self.resnet_layers.len().max(1) - 1)
    }
    /// Channels of the ResNet's last stage (the attention pool's width).
    pub fn resnet_channels(&self) -> i64 {
        (self.width << (self.resnet_layers.len().max(1) - 1)) * 4
    }
    pub fn mlp(&self) -> i64 {
        self.mlp_width.unwrap_or(4 * self.width)
    }
    pub fn patches(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2)
    }
}

impl TextConfig {
    pub fn mlp(&self) -> i64 {
        self.mlp_width.unwrap_or(4 * self.width)
    }
}

fn check_tower(name: &str, width: i64, layers: i64, heads: i64, mlp: i64) -> Result<()> {
    ensure!(
        width > 0 && layers > 0 && heads > 0 && mlp > 0,
        "model.{name}: width, layers, heads and mlp_width must be > 0"
    );
    ensure!(
        width % heads == 0,
        "model.{name}.width ({width}) must be divisible by model.{name}.heads ({heads})"
    );
    Ok(())
}

impl ClipConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.embed_dim > 0, "model.embed_dim must be > 0");
        let v = &self.vision;
        if v.is_resnet() {
            ensure!(
                v.patch_size == 0 && v.layers == 0 && v.mlp_width.is_none(),
                "model.vision: patch_size, layers and mlp_width are the ViT's; a ResNet \
                 (model.vision.resnet_layers) takes image_size, width, heads"
            );
            ensure!(
                v.resnet_layers.iter().all(|&n| n > 0) && v.resnet_layers.len() <= 6,
                "model.vision.resnet_layers must be 1 to 6 stages of at least one block each"
            );
            ensure!(
                v.width >= 2 && v.width % 2 == 0 && v.heads > 0,
                "model.vision: a ResNet needs an even width >= 2 and heads > 0"
            );
            let c = v.resnet_channels();
            ensure!(
                c % v.heads == 0,
                "model.vision.heads ({}) must divide the ResNet's final channels ({c})",
                v.heads
            );
            let d = v.resnet_downsampling();
            ensure!(
                v.image_size > 0 && v.image_size % d == 0,
                "model.vision.image_size ({}) must be a multiple of the ResNet's stride ({d})",
                v.image_size
            );
        } else {
            check_tower("vision", v.width, v.layers, v.heads, v.mlp())?;
            ensure!(
                v.patch_size > 0 && v.image_size > 0 && v.image_size % v.patch_size == 0,
                "model.vision.image_size ({}) must be a multiple of model.vision.patch_size ({})",
                v.image_size,
                v.patch_size
            );
        }
        let t = &self.text;
        check_tower("text", t.width, t.layers, t.heads, t.mlp())?;
        ensure!(
            t.vocab_size > 2 && t.context_length > 1,
            "model.text: vocab_size must be > 2 and context_length > 1"
        );
        ensure!(
            self.logit_scale_max > 1.0 && self.logit_scale_init.is_finite(),
            "model.logit_scale_max must be > 1 and logit_scale_init finite"
        );
        ensure!(
            self.layer_norm_eps > 0.0,
            "model.layer_norm_eps must be > 0"
        );
        Ok(())
    }
}
