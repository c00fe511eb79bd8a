//! Conditioning corruptions for the upsamplers (SPEC: the 64→256 stage blurs its low-resolution
//! input with a Gaussian, kernel 3, σ = 0.6). Same maths as torchvision's `gaussian_blur`:
//! a normalised separable kernel over x = −(k−1)/2 … (k−1)/2, reflect padding, float accumulation,
//! rounded back to 8 bits.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// `degrade.blur:` in upsampler configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlurConfig {
    /// Odd kernel size, at least 3.
    pub kernel: usize,
    pub sigma: f32,
    /// Draw σ uniformly from [lo, hi] per image instead.
    pub sigma_range: Option<[f32; 2]>,
}

impl Default for BlurConfig {
    fn default() -> Self {
        Self {
            kernel: 3,
            sigma: 0.6,
            sigma_range: None,
        }
    }
}

impl BlurConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.kernel < 3 || self.kernel.is_multiple_of(2) {
            return Err(format!(
                "blur.kernel must be odd and >= 3, got {}",
                self.kernel
            ));
        }
        let positive = |s: f32| s.is_finite() && s > 0.0;
        if !positive(self.sigma) {
            return Err(format!("blur.sigma must be > 0, got {}", self.sigma));
        }
        if let Some([lo, hi]) = self.sigma_range {
            if !(positive(lo) && positive(hi) && lo <= hi) {
                return Err(format!(
                    "blur.sigma_range must be 0 < lo <= hi, got [{lo}, {hi}]"
                ));
            }
        }
        Ok(())
    }

    /// The σ for one image.
    pub fn draw_sigma(&self, rng: &mut impl Rng) -> f32 {
        match self.sigma_range {
            Some([lo, hi]) if hi > lo => rng.gen_range(lo..=hi),
            Some([lo, _]) => lo,
            None => self.sigma,
        }
    }
}

/// The normalised 1-D Gaussian of `kernel` taps.
pub fn gaussian_kernel(kernel: usize, sigma: f32) -> Vec<f32> {
    let half = (kernel as f32 - 1.0) / 2.0;
    let taps: Vec<f32> = (0..kernel)
        .map(|i| (-0.5 * ((i as f32 - half) / sigma).powi(2)).exp())
        .collect();
    let sum: f32 = taps.iter().sum();
    taps.into_iter().map(|t| t / sum).collect()
}

/// Reflect index (no edge repeat), as torch's "reflect" padding.
pub(crate) fn reflect(i: isize, n: isize) -> usize {
    let mut i = i;
    if n == 1 {
        return 0;
    }
    while i < 0 || i >= n {
        i = if i < 0 { -i } else { 2 * (n - 1) - i };
    }
    i as usize
}

/// One 1-D pass of `taps` along x (`horizontal`) or y, with reflect padding.
fn convolve_1d(
    src: &[f32],
    width: usize,
    height: usize,
    taps: &[f32],
    horizontal: bool,
) -> Vec<f32> {
    let r = (taps.len() / 2) as isize;
    let mut out = vec![0f32; width * height];
    for y in 0..height {
        for x in 0..width {
            out[y * width + x] = taps
                .iter()
                .enumerate()
                .map(|(t, k)| {
                    let offset = t as isize - r;
                    let (sx, sy) = if horizontal {
                        (reflect(x as isize + offset, width as isize), y)
                    } else {
                        (x, reflect(y as isize + offset, height as isize))
                    };
                    k * src[sy * width + sx]
                })
                .sum();
        }
    }
    out
}

/// Blurs planar float channels `[c][y * width + x]`: rows, then columns.
pub fn blur_planes(
    planes: &[Vec<f32>],
    width: usize,
    height: usize,
    kernel: usize,
    sigma: f32,
) -> Vec<Vec<f32>> {
    let taps = gaussian_kernel(kernel, sigma);
    planes
        .iter()
        .map(|p| {
            convolve_1d(
                &convolve_1d(p, width, height, &taps, true),
                width,
                height,
                &taps,
                false,
            )
        })
        .collect()
}

/// Gaussian blur of an RGB image, rounded back to 8 bits.
pub fn gaussian_blur(img: &image::RgbImage, kernel: usize, sigma: f32) -> image::RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let planes: Vec<Vec<f32>> = (0..3)
        .map(|c| img.pixels().map(|p| p[c] as f32).collect())
        .collect();
    let blurred = blur_planes(&planes, w, h, kernel, sigma);
    image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        image::Rgb([0, 1, 2].map(|c| blurred[c][i].round().clamp(0.0, 255.0) as u8))
    })
}
