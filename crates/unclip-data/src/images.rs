//! Encoded image → square float CHW tensor data: decode, RGB, a square crop of the shorter side
//! (centre or random), resize to the training resolution, optional horizontal flip, normalise.
//!
//! The crop is taken before the resize (same region as "resize the shorter side, then crop", far
//! less work), and the resize is a SIMD convolution (fast_image_resize).

// resize_typed with the one pixel type used: the untyped `resize` instantiates every pixel type's
// SIMD kernels in this crate (it doubled the crate's build time).
use fast_image_resize::images::{TypedImage, TypedImageRef};
use fast_image_resize::{pixels::U8x3, FilterType, ResizeAlg, ResizeOptions, Resizer};
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Crop {
    Center,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resample {
    Bilinear,
    /// PIL's and CLIP's default (Catmull-Rom, a = −0.5).
    Bicubic,
    Lanczos3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// x / 127.5 − 1: what the diffusion models see.
    MinusOneOne,
    /// CLIP's per-channel mean and std, for pretrained OpenAI / open_clip weights.
    Clip,
}

/// `data.image:` in configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageTransform {
    pub resolution: u32,
    pub crop: Crop,
    pub random_flip: bool,
    pub resample: Resample,
    pub normalize: Normalize,
}

impl Default for ImageTransform {
    fn default() -> Self {
        Self {
            resolution: 64,
            crop: Crop::Center,
            random_flip: false,
            resample: Resample::Bicubic,
            normalize: Normalize::MinusOneOne,
        }
    }
}

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl ImageTransform {
    pub fn validate(&self) -> Result<(), String> {
        if !(8..=4096).contains(&self.resolution) {
            return Err(format!(
                "image.resolution must be in 8..=4096, got {}",
                self.resolution
            ));
        }
        Ok(())
    }

    /// Floats per image: 3 × resolution².
    pub fn numel(&self) -> usize {
        3 * (self.resolution as usize).pow(2)
    }

    /// Each encoded image decoded and transformed, in parallel, with a fixed seed (deterministic
    /// without a random flip: what inference-time preprocessing wants); an image that cannot be
    /// decoded is its error message.
    pub fn apply_all(&self, encoded: &[&[u8]]) -> Vec<Result<Vec<f32>, String>> {
        use rand::SeedableRng;
        use rayon::prelude::*;
        encoded
            .par_iter()
            .map(|bytes| {
                let mut px = vec![0.0; self.numel()];
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
                self.apply(bytes, &mut rng, &mut px).map(|()| px)
            })
            .collect()
    }

    /// Decode and transform one image into `out` (CHW, `numel()` floats).
    pub fn apply(&self, encoded: &[u8], rng: &mut impl Rng, out: &mut [f32]) -> Result<(), String> {
        let rgb = image::load_from_memory(encoded)
            .map_err(|e| format!("undecodable image: {e}"))?
            .into_rgb8();
        let (w, h) = rgb.dimensions();
        self.apply_rgb(w, h, rgb.as_raw(), rng, out)
    }

    /// Transform interleaved RGB8 pixels.
    pub fn apply_rgb(
        &self,
        width: u32,
        height: u32,
        rgb: &[u8],
        rng: &mut impl Rng,
        out: &mut [f32],
    ) -> Result<(), String> {
        if width == 0 || height == 0 {
            return Err("empty image".into());
        }
        let side = width.min(height);
        let (left, top) = match self.crop {
            Crop::Center => ((width - side) / 2, (height - side) / 2),
            Crop::Random => (
                rng.gen_range(0..=width - side),
                rng.gen_range(0..=height - side),
            ),
        };
        let flip = self.random_flip && rng.gen_bool(0.5);
        let res = self.resolution;
        let resized;
        let pixels: &[u8] = if side == res && width == res && height == res {
            rgb
        } else {
            let src = TypedImageRef::<U8x3>::from_buffer(width, height, rgb)
                .map_err(|e| format!("bad image buffer: {e}"))?;
            let mut out_rgb = vec![0u8; res as usize * res as usize * 3];
            let mut dst = TypedImage::<U8x3>::from_buffer(res, res, &mut out_rgb)
                .map_err(|e| format!("bad image buffer: {e}"))?;
            let filter = match self.resample {
                Resample::Bilinear => FilterType::Bilinear,
                Resample::Bicubic => FilterType::CatmullRom,
                Resample::Lanczos3 => FilterType::Lanczos3,
            };
            let options = ResizeOptions::new()
                .resize_alg(ResizeAlg::Convolution(filter))
                .crop(
                    f64::from(left),
                    f64::from(top),
                    f64::from(side),
                    f64::from(side),
                );
            Resizer::new()
                .resize_typed(&src, &mut dst, &options)
                .map_err(|e| format!("resize failed: {e}"))?;
            resized = out_rgb;
            &resized
        };
        write_chw(pixels, res as usize, flip, self.normalize, out);
        Ok(())
    }
}

/// HWC u8 → normalised CHW f32, optionally mirrored left-right.
fn write_chw(hwc: &[u8], res: usize, flip: bool, normalize: Normalize, out: &mut [f32]) {
    let (scale, shift): ([f32; 3], [f32; 3]) = match normalize {
        Normalize::MinusOneOne => ([1.0 / 127.5; 3], [-1.0; 3]),
        Normalize::Clip => {
            let mut scale = [0.0; 3];
            let mut shift = [0.0; 3];
            for c in 0..3 {
                scale[c] = 1.0 / (255.0 * CLIP_STD[c]);
                shift[c] = -CLIP_MEAN[c] / CLIP_STD[c];
            }
            (scale, shift)
        }
    };
    let plane = res * res;
    for y in 0..res {
        let row = &hwc[y * res * 3..(y + 1) * res * 3];
        for x in 0..res {
            let sx = if flip { res - 1 - x } else { x };
            for c in 0..3 {
                out[c * plane + y * res + x] = f32::from(row[sx * 3 + c]) * scale[c] + shift[c];
            }
        }
    }
}
