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
        match &self.conv {
            Some(c) => upsample_conv3x3(x, c),
            None => upsample_nearest(x),
        }
    }
}

/// Nearest-neighbour 2× upsampling of [B, C, H, W].
pub fn upsample_nearest(x: &Tensor) -> Tensor {
    let size = x.size();
    x.upsample_nearest2d([size[2] * 2, size[3] * 2], None, None)
}

/// `conv(upsample_nearest(x))` for a 3×3 `conv` with stride 1 and padding 1, computed from x. In
/// a nearest-upsampled map the output pixels of each phase (row parity a, column parity b) see a
/// 2×2 window of x whose taps are sums of the 3×3 taps — phase 0 reads rows (i − 1, i) with taps
/// (w₀, w₁ + w₂), phase 1 rows (i, i + 1) with (w₀ + w₁, w₂), likewise for columns — so four 2×2
/// convolutions of x replace the 3×3 one at twice the size: the same function with 2.25× fewer
/// FLOPs and no upsampled copy (forward + backward 1.6–1.8× faster on CPU at the shapes decoder's
/// widths: scripts/bench/decoder_alternatives.py). On CUDA, where it has not been measured yet,
/// cuDNN's one convolution of the upsampled map runs instead.
pub fn upsample_conv3x3(x: &Tensor, conv: &nn::Conv2D) -> Tensor {
    debug_assert_eq!(conv.ws.size()[2..], [3, 3]);
    if x.device().is_cuda() {
        return conv.forward(&upsample_nearest(x));
    }
    let size = x.size();
    let (h, w) = (size[2], size[3]);
    let taps = |k: &Tensor, dim: i64| -> [Tensor; 2] {
        let tap = |i: i64| k.narrow(dim, i, 1);
        [
            Tensor::cat(&[tap(0), tap(1) + tap(2)], dim),
            Tensor::cat(&[tap(0) + tap(1), tap(2)], dim),
        ]
    };
    let mut phases = Vec::with_capacity(4);
    for (a, rows) in taps(&conv.ws, 2).iter().enumerate() {
        let a = a as i64;
        for (b, kernel) in taps(rows, 3).iter().enumerate() {
            let b = b as i64;
            // Padding [left, right, top, bottom]: phase (a, b) reads rows i − 1 + a, i + a.
            let padded = x.constant_pad_nd([1 - b, b, 1 - a, a]);
            phases.push(padded.conv2d(kernel, conv.bs.as_ref(), [1, 1], [0, 0], [1, 1], 1));
        }
    }
    // [B, C, H, 2 (a), W, 2 (b)] → [B, C, 2H, 2W].
    let rows: Vec<Tensor> = phases.chunks(2).map(|p| Tensor::stack(p, -1)).collect();
    let out = Tensor::stack(&rows, 3);
    let c = out.size()[1];
    out.reshape([size[0], c, 2 * h, 2 * w])
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
