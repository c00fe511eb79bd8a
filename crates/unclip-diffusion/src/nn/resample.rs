//! 2× up- and down-sampling of feature maps (ADM / diffusers `Upsample2D`, `Downsample2D`).

use super::init;
use tch::nn::{self, Module};
use tch::Tensor;

/// Nearest-neighbour 2× upsampling, optionally followed by a 3×3 convolution `conv`.
#[derive(Debug)]
pub struct Upsample {
    conv: Option<nn::Conv2D>,
}

impl Upsample {
    pub fn new(p: nn::Path, channels: i64, out_channels: i64, use_conv: bool) -> Self {
        let cfg = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Self {
            conv: use_conv.then(|| init::conv2d(&p / "conv", channels, out_channels, 3, cfg)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let up = x.upsample_nearest2d([size[2] * 2, size[3] * 2], None, None);
        match &self.conv {
            Some(c) => c.forward(&up),
            None => up,
        }
    }
}

/// 2× downsampling: a strided 3×3 convolution `conv`, or 2×2 average pooling.
#[derive(Debug)]
pub struct Downsample {
    conv: Option<nn::Conv2D>,
}

impl Downsample {
    pub fn new(p: nn::Path, channels: i64, out_channels: i64, use_conv: bool) -> Self {
        let cfg = nn::ConvConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        Self {
            conv: use_conv.then(|| init::conv2d(&p / "conv", channels, out_channels, 3, cfg)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match &self.conv {
            Some(c) => c.forward(x),
            None => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None),
        }
    }
}
