//! ADM residual block (Dhariwal & Nichol 2021) with scale-shift conditioning: GroupNorm → SiLU →
//! conv → norm(h)·(1 + scale) + shift from the embedding → SiLU → dropout → conv, plus a skip (1×1
//! conv when the width changes); or, as diffusers' `resnet_time_scale_shift: default` (Karlo's
//! upsamplers), the projected embedding added after the first conv instead. Names and
//! initialisation follow diffusers' `ResnetBlock2D` (PyTorch's defaults; no zero-initialised last
//! conv as in ADM): so initialised, the shapes decoder trains as fast as diffusers' does from the
//! same recipe (docs/decoder-shapes.md).

use super::init;
use super::norm_act::{group_norm_act, group_norm_silu};
use super::resample::{upsample_conv3x3, Downsample, Upsample};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// Optional resampling inside the block (ADM's `resblock_updown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resample {
    #[default]
    None,
    Up,
    Down,
}

/// How the conditioning embedding enters a block (diffusers' `resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeScaleShift {
    /// norm2(h)·(1 + scale) + shift (ADM's, the UnCLIP decoder's).
    #[default]
    ScaleShift,
    /// h + proj(emb) after the first conv (diffusers' `default`).
    Default,
}

#[derive(Debug, Clone)]
pub struct ResBlockConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Width of the conditioning embedding (timestep + CLIP); 0 for none.
    pub emb_channels: i64,
    pub groups: i64,
    pub eps: f64,
    pub dropout: f64,
    pub resample: Resample,
    pub time_scale_shift: TimeScaleShift,
}

impl ResBlockConfig {
    pub fn new(in_channels: i64, out_channels: i64, emb_channels: i64) -> Self {
        Self {
            in_channels,
            out_channels,
            emb_channels,
            groups: 32,
            eps: 1e-5,
            dropout: 0.0,
            resample: Resample::None,
            time_scale_shift: TimeScaleShift::ScaleShift,
        }
    }
}

#[derive(Debug)]
pub struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    up: Option<Upsample>,
    down: Option<Downsample>,
    dropout: f64,
    eps: f64,
    time_scale_shift: TimeScaleShift,
}

impl ResBlock {
    pub fn new(p: nn::Path, c: &ResBlockConfig) -> Self {
        let gn = nn::GroupNormConfig {
            eps: c.eps,
            ..Default::default()
        };
        let conv3 = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Self {
            norm1: nn::group_norm(&p / "norm1", c.groups, c.in_channels, gn),
            conv1: init::conv2d(&p / "conv1", c.in_channels, c.out_channels, 3, conv3),
            time_emb_proj: (c.emb_channels > 0).then(|| {
                let width = match c.time_scale_shift {
                    TimeScaleShift::ScaleShift => 2 * c.out_channels,
                    TimeScaleShift::Default => c.out_channels,
                };
                init::linear(&p / "time_emb_proj", c.emb_channels, width)
            }),
            norm2: nn::group_norm(&p / "norm2", c.groups, c.out_channels, gn),
            conv2: init::conv2d(&p / "conv2", c.out_channels, c.out_channels, 3, conv3),
            conv_shortcut: (c.in_channels != c.out_channels).then(|| {
                init::conv2d(
                    &p / "conv_shortcut",
                    c.in_channels,
                    c.out_channels,
                    1,
                    Default::default(),
                )
            }),
            up: (c.resample == Resample::Up)
                .then(|| Upsample::new(&p / "upsample", c.in_channels, c.in_channels, false)),
            down: (c.resample == Resample::Down)
                .then(|| Downsample::new(&p / "downsample", c.in_channels, c.in_channels, false)),
            dropout: c.dropout,
            eps: c.eps,
            time_scale_shift: c.time_scale_shift,
        }
    }

    /// SiLU(norm2(h)·(1 + scale) + shift) with `scale_shift` [B, 2C]. GroupNorm's affine (γ, β)
    /// is folded into per-sample coefficients, (γ(1 + scale))·ĥ + (β(1 + scale) + shift), so the
    /// chain is one fused normalise-affine-SiLU (`group_norm_act`).
    fn norm2_scale_shift_silu(&self, h: &Tensor, scale_shift: &Tensor) -> Tensor {
        let parts = scale_shift.chunk(2, 1);
        let (scale, shift) = (&parts[0] + 1.0, &parts[1]);
        let gain = self
            .norm2
            .ws
            .as_ref()
            .map_or_else(|| scale.shallow_clone(), |g| g * &scale);
        let bias = match &self.norm2.bs {
            Some(b) => b * &scale + shift,
            None => shift.shallow_clone(),
        };
        group_norm_act(
            h,
            self.norm2.num_groups,
            self.eps,
            Some(&gain),
            Some(&bias),
            true,
        )
    }

    /// x: [B, C_in, H, W], emb: [B, emb_channels] → [B, C_out, H', W'].
    pub fn forward_t(&self, x: &Tensor, emb: Option<&Tensor>, train: bool) -> Tensor {
        let h = group_norm_silu(&self.norm1, self.eps, x);
        let (h, skip) = if let Some(up) = &self.up {
            // Upsampling then conv1, as one sub-pixel convolution of the low-resolution map.
            (upsample_conv3x3(&h, &self.conv1), up.forward(x))
        } else if let Some(down) = &self.down {
            (self.conv1.forward(&down.forward(&h)), down.forward(x))
        } else {
            (self.conv1.forward(&h), x.shallow_clone())
        };
        let h = match (&self.time_emb_proj, emb, self.time_scale_shift) {
            (Some(proj), Some(emb), TimeScaleShift::ScaleShift) => {
                self.norm2_scale_shift_silu(&h, &proj.forward(&emb.silu()))
            }
            (Some(proj), Some(emb), TimeScaleShift::Default) => {
                let add = proj.forward(&emb.silu()).unsqueeze(-1).unsqueeze(-1);
                group_norm_silu(&self.norm2, self.eps, &(h + add))
            }
            _ => group_norm_silu(&self.norm2, self.eps, &h),
        };
        let h = self.conv2.forward(&h.dropout(self.dropout, train));
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward_t(&skip, train),
            None => skip,
        };
        skip + h
    }
}
