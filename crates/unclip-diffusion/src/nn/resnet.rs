//! ADM residual block (Dhariwal & Nichol 2021) with scale-shift conditioning: GroupNorm → SiLU →
//! conv → norm(h)·(1 + scale) + shift from the embedding → SiLU → dropout → conv (zero-initialised),
//! plus a skip (1×1 conv when the width changes). Names follow diffusers' `ResnetBlock2D`.

use super::resample::{Downsample, Upsample};
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
        let zero = nn::ConvConfig {
            padding: 1,
            ws_init: nn::Init::Const(0.0),
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        Self {
            norm1: nn::group_norm(&p / "norm1", c.groups, c.in_channels, gn),
            conv1: nn::conv2d(&p / "conv1", c.in_channels, c.out_channels, 3, conv3),
            time_emb_proj: (c.emb_channels > 0).then(|| {
                nn::linear(
                    &p / "time_emb_proj",
                    c.emb_channels,
                    2 * c.out_channels,
                    Default::default(),
                )
            }),
            norm2: nn::group_norm(&p / "norm2", c.groups, c.out_channels, gn),
            conv2: nn::conv2d(&p / "conv2", c.out_channels, c.out_channels, 3, zero),
            conv_shortcut: (c.in_channels != c.out_channels).then(|| {
                nn::conv2d(
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
        }
    }

    /// x: [B, C_in, H, W], emb: [B, emb_channels] → [B, C_out, H', W'].
    pub fn forward_t(&self, x: &Tensor, emb: Option<&Tensor>, train: bool) -> Tensor {
        let mut h = self.norm1.forward(x).silu();
        let mut skip = x.shallow_clone();
        if let Some(up) = &self.up {
            h = up.forward(&h);
            skip = up.forward(&skip);
        } else if let Some(down) = &self.down {
            h = down.forward(&h);
            skip = down.forward(&skip);
        }
        let mut h = self.norm2.forward(&self.conv1.forward(&h));
        if let (Some(proj), Some(emb)) = (&self.time_emb_proj, emb) {
            let ss = proj.forward(&emb.silu()).unsqueeze(-1).unsqueeze(-1);
            let parts = ss.chunk(2, 1);
            h = h * (&parts[0] + 1.0) + &parts[1];
        }
        let h = self.conv2.forward(&h.silu().dropout(self.dropout, train));
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward_t(&skip, train),
            None => skip,
        };
        skip + h
    }
}
