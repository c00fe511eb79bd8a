//! The upsampler: an attention-free UNet whose input is the noisy high-resolution image
//! concatenated with the upsampled low-resolution conditioning.

use anyhow::{ensure, Result};
use tch::{nn, Tensor};
use unclip_decoder::UNet;

use crate::config::{UpsamplerModelConfig, IMAGE_CHANNELS};

/// Where the UNet's variables live in a run's checkpoints (`unet.conv_in.weight`, …; below it,
/// diffusers' `UNet2DModel` names).
pub const UNET_PREFIX: &str = "unet";

#[derive(Debug)]
pub struct Upsampler {
    pub unet: UNet,
    pub cfg: UpsamplerModelConfig,
}

impl Upsampler {
    /// Builds the UNet under `p / "unet"`.
    pub fn new(p: nn::Path, cfg: &UpsamplerModelConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            unet: UNet::attention_free(&p / UNET_PREFIX, &cfg.unet())?,
            cfg: cfg.clone(),
        })
    }

    /// x_t [B, 3, H, W] with the upsampled conditioning [B, 3, H, W] (see
    /// [`crate::low_res::upsample_condition`]) at training timesteps t [B] → [B, out, H, W].
    pub fn forward_t(
        &self,
        x_t: &Tensor,
        low_res: &Tensor,
        t: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        ensure!(
            x_t.size() == low_res.size() && x_t.size().get(1) == Some(&IMAGE_CHANNELS),
            "upsampler input {:?} and conditioning {:?} must both be [B, 3, H, W]",
            x_t.size(),
            low_res.size()
        );
        let input = Tensor::f_cat(&[x_t, &low_res.to_kind(x_t.kind())], 1)?;
        self.unet.forward_unconditional(&input, t, train)
    }
}
