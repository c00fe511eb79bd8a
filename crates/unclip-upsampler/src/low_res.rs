//! The upsamplers' conditioning: the high-resolution image brought down to the low resolution
//! (area averaging, as the stage before would have produced it), in training corrupted as the
//! paper does — Gaussian blur for 64→256, BSRGAN's degradations for 256→1024 — so the upsampler
//! learns to tolerate the previous stage's flaws; then brought back up (antialiased bicubic, as
//! diffusers' UnCLIP pipeline does) to be concatenated to the UNet's input.

use anyhow::{anyhow, ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use unclip_data::bsr::{bsr_degrade, BsrConfig, Planes};
use unclip_data::degrade::{gaussian_blur, BlurConfig};

/// How the conditioning image is corrupted in training (never at inference).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Corruption<'a> {
    /// The clean low-resolution image.
    None,
    /// Gaussian blur of the low-resolution image (the 64→256 stage: kernel 3, σ 0.6).
    Blur(&'a BlurConfig),
    /// BSRGAN's degradation pipeline from the high-resolution image (the 256→1024 stage).
    Bsr(&'a BsrConfig),
}

/// The `upsampler.low_res:` section. At most one of `blur` and `bsr`; neither: the clean image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LowResConfig {
    /// Side of the conditioning image (64 for the 64→256 stage).
    pub resolution: u32,
    /// Gaussian blur of the low-resolution image (`{kernel: 3, sigma: 0.6}`; `sigma_range: [lo,
    /// hi]` draws σ per image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blur: Option<BlurConfig>,
    /// BSRGAN's degradations of the high-resolution image down to the low resolution; `scale`
    /// must be the ratio of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bsr: Option<BsrConfig>,
}

impl LowResConfig {
    pub fn corruption(&self) -> Corruption<'_> {
        match (&self.blur, &self.bsr) {
            (Some(b), _) => Corruption::Blur(b),
            (None, Some(b)) => Corruption::Bsr(b),
            (None, None) => Corruption::None,
        }
    }

    /// Checks against the high resolution `high`; errors name the keys.
    pub fn validate(&self, high: u32) -> Result<()> {
        let low = self.resolution;
        ensure!(
            low >= 1 && high > low && high.is_multiple_of(low),
            "upsampler.low_res.resolution ({low}) must divide data.image.resolution ({high}) and be smaller"
        );
        ensure!(
            self.blur.is_none() || self.bsr.is_none(),
            "upsampler.low_res: set blur or bsr, not both"
        );
        match self.corruption() {
            Corruption::None => {}
            Corruption::Blur(b) => b.validate().map_err(|e| anyhow!("upsampler.low_res.{e}"))?,
            Corruption::Bsr(b) => {
                b.validate().map_err(|e| anyhow!("upsampler.low_res.{e}"))?;
                ensure!(
                    b.scale as u32 * low == high,
                    "upsampler.low_res.bsr.scale ({}) must be data.image.resolution / \
                     upsampler.low_res.resolution ({high} / {low})",
                    b.scale
                );
            }
        }
        Ok(())
    }

    /// The training conditioning of high-resolution images `high` [B, 3, H, W] in [-1, 1]:
    /// [B, 3, h, w] at this resolution, corrupted, image i with randomness from `seeds[i]`.
    pub fn corrupted(&self, high: &Tensor, seeds: &[u64]) -> Result<Tensor> {
        let low = i64::from(self.resolution);
        let device = high.device();
        match self.corruption() {
            Corruption::None => Ok(downsample(high, low)),
            Corruption::Blur(cfg) => {
                let images = to_rgb8(&downsample(high, low))?;
                ensure!(images.len() == seeds.len(), "one seed per image");
                let blurred: Vec<image::RgbImage> = images
                    .par_iter()
                    .zip(seeds)
                    .map(|(img, &seed)| {
                        let sigma = cfg.draw_sigma(&mut ChaCha8Rng::seed_from_u64(seed));
                        gaussian_blur(img, cfg.kernel, sigma)
                    })
                    .collect();
                from_rgb8(&blurred, device)
            }
            Corruption::Bsr(cfg) => {
                let images = to_rgb8(high)?;
                ensure!(images.len() == seeds.len(), "one seed per image");
                let degraded: Vec<image::RgbImage> = images
                    .par_iter()
                    .zip(seeds)
                    .map(|(img, &seed)| {
                        let mut rng = ChaCha8Rng::seed_from_u64(seed);
                        bsr_degrade(&Planes::from_rgb8(img), cfg, &mut rng)
                            .0
                            .to_rgb8()
                    })
                    .collect();
                from_rgb8(&degraded, device)
            }
        }
    }
}

/// Area averaging to `side` × `side` (torch's `interpolate(mode="area")`).
pub fn downsample(images: &Tensor, side: i64) -> Tensor {
    images.adaptive_avg_pool2d([side, side])
}

/// The low-resolution image [B, 3, h, w] brought to `side` × `side` for the UNet's input: bicubic
/// with antialiasing, as diffusers' UnCLIP pipeline upsamples the decoder's output (PIL's cubic
/// kernel, a = −0.5). Computed in fp32.
pub fn upsample_condition(low: &Tensor, side: i64) -> Tensor {
    low.to_kind(Kind::Float)
        .internal_upsample_bicubic2d_aa([side, side], false, None, None)
}

/// [B, 3, H, W] in [-1, 1] → 8-bit images.
fn to_rgb8(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = images.size4()?;
    ensure!(c == 3, "expected RGB images, got {c} channels");
    let bytes = ((images.to_kind(Kind::Float).to_device(Device::Cpu) + 1.0) * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    let flat = Vec::<u8>::try_from(bytes.view([-1])).context("image bytes")?;
    let per = (h * w * 3) as usize;
    (0..b as usize)
        .map(|i| {
            image::RgbImage::from_raw(w as u32, h as u32, flat[i * per..(i + 1) * per].to_vec())
                .context("image buffer size")
        })
        .collect()
}

/// 8-bit images of one size → [B, 3, h, w] in [-1, 1] on `device`.
fn from_rgb8(images: &[image::RgbImage], device: Device) -> Result<Tensor> {
    let first = images.first().context("no images")?;
    let (w, h) = (i64::from(first.width()), i64::from(first.height()));
    let mut flat = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for img in images {
        ensure!(
            i64::from(img.width()) == w && i64::from(img.height()) == h,
            "degraded images differ in size"
        );
        flat.extend_from_slice(img.as_raw());
    }
    Ok(Tensor::from_slice(&flat)
        .view([images.len() as i64, h, w, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        .to_device(device)
        / 127.5
        - 1.0)
}
