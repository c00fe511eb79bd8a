//! What the CLIP tests share.
use unclip_clip::config::{Activation, ClipConfig, TextConfig, VisionConfig};

/// A two-layer ViT-B-like CLIP at 32 px with the given MLP widths (the parity fixtures').
pub fn tiny_vit(mlp_text: i64, mlp_vision: i64) -> ClipConfig {
    ClipConfig {
        embed_dim: 24,
        vision: VisionConfig {
            image_size: 32,
            patch_size: 8,
            width: 48,
            layers: 2,
            heads: 4,
            mlp_width: Some(mlp_vision),
            resnet_layers: Vec::new(),
        },
        text: TextConfig {
            vocab_size: 1000,
            context_length: 16,
            width: 32,
            layers: 2,
            heads: 4,
            mlp_width: Some(mlp_text),
        },
        activation: Activation::QuickGelu,
        logit_scale_init: 2.6592,
        logit_scale_max: 100.0,
        layer_norm_eps: 1e-5,
    }
}
