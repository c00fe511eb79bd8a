//! The BSR degradation of BSRGAN (Zhang et al. 2021, `degradation_bsrgan_variant`): the 256→1024
//! upsampler's conditioning corruption (SPEC). On an RGB image in [0, 1] with scale factor `sf`:
//!
//! 1. crop to a multiple of `sf`; with probability `scale2_prob` (sf = 4 only) first halve the
//!    image (random interpolation) and continue with sf = 2;
//! 2. in a random order — keeping the second down-sampling before the last — two blurs
//!    (isotropic or anisotropic Gaussian, kernel 7–25), a down-sampling by a random factor in
//!    [1, 2·sf] (random interpolation, or a Gaussian blur then nearest sampling), the final
//!    down-sampling to 1/sf of the size, Gaussian noise (σ ∈ [2, 25]/255; colour, grey or
//!    channel-correlated), and JPEG compression with probability `jpeg_prob`;
//! 3. JPEG compression at a random quality in [30, 95];
//! 4. optionally (`second_round_prob`) a second blur / noise / JPEG round at the low resolution.
//!
//! BSRGAN's camera-ISP step needs a learned model and is skipped, as in its own variant. cv2's
//! linear / cubic / area interpolations become fast_image_resize's bilinear / Catmull-Rom / box
//! convolutions (the same kernels, antialiased when shrinking).

use fast_image_resize::images::{TypedImage, TypedImageRef};
use fast_image_resize::{pixels::F32, FilterType, ResizeAlg, ResizeOptions, Resizer};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::degrade::reflect;

/// `degrade.bsr:` in upsampler configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BsrConfig {
    /// High-resolution side / low-resolution side (4 for 1024→256).
    pub scale: usize,
    pub scale2_prob: f64,
    pub jpeg_prob: f64,
    /// Noise σ range in 8-bit levels.
    pub noise_levels: [f32; 2],
    pub jpeg_quality: [u8; 2],
    pub second_round_prob: f64,
}

impl Default for BsrConfig {
    fn default() -> Self {
        Self {
            scale: 4,
            scale2_prob: 0.25,
            jpeg_prob: 0.9,
            noise_levels: [2.0, 25.0],
            jpeg_quality: [30, 95],
            second_round_prob: 0.0,
        }
    }
}

impl BsrConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=8).contains(&self.scale) {
            return Err(format!("bsr.scale must be in 2..=8, got {}", self.scale));
        }
        for (name, p) in [
            ("scale2_prob", self.scale2_prob),
            ("jpeg_prob", self.jpeg_prob),
            ("second_round_prob", self.second_round_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("bsr.{name} must be in [0, 1], got {p}"));
            }
        }
        let [lo, hi] = self.noise_levels;
        if !(lo >= 0.0 && hi >= lo) {
            return Err(format!(
                "bsr.noise_levels must be 0 <= lo <= hi, got {lo}, {hi}"
            ));
        }
        let [qlo, qhi] = self.jpeg_quality;
        if !(1..=100).contains(&qlo) || qhi < qlo || qhi > 100 {
            return Err(format!(
                "bsr.jpeg_quality must be 1 <= lo <= hi <= 100, got {qlo}, {qhi}"
            ));
        }
        Ok(())
    }
}

/// A planar RGB float image `[c][y * width + x]`, values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    pub width: usize,
    pub height: usize,
    pub data: [Vec<f32>; 3],
}

impl Planes {
    pub fn from_rgb8(img: &image::RgbImage) -> Self {
        let (width, height) = (img.width() as usize, img.height() as usize);
        let data = [0, 1, 2].map(|c| {
            img.pixels()
                .map(|p| f32::from(p[c]) / 255.0)
                .collect::<Vec<_>>()
        });
        Self {
            width,
            height,
            data,
        }
    }

    pub fn to_rgb8(&self) -> image::RgbImage {
        image::RgbImage::from_fn(self.width as u32, self.height as u32, |x, y| {
            let i = y as usize * self.width + x as usize;
            image::Rgb([0, 1, 2].map(|c| (self.data[c][i] * 255.0).round().clamp(0.0, 255.0) as u8))
        })
    }

    fn crop(&self, left: usize, top: usize, width: usize, height: usize) -> Self {
        let data = [0, 1, 2].map(|c| {
            let mut out = Vec::with_capacity(width * height);
            for y in top..top + height {
                let row = y * self.width;
                out.extend_from_slice(&self.data[c][row + left..row + left + width]);
            }
            out
        });
        Self {
            width,
            height,
            data,
        }
    }

    fn clamp01(&mut self) {
        for p in &mut self.data {
            p.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Interp {
    Linear,
    Cubic,
    Area,
}

fn random_interp(rng: &mut impl Rng) -> Interp {
    [Interp::Linear, Interp::Cubic, Interp::Area][rng.gen_range(0..3)]
}

fn resize(img: &Planes, width: usize, height: usize, interp: Interp) -> Planes {
    let width = width.max(1);
    let height = height.max(1);
    let filter = match interp {
        Interp::Linear => FilterType::Bilinear,
        Interp::Cubic => FilterType::CatmullRom,
        Interp::Area => FilterType::Box,
    };
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
    let mut resizer = Resizer::new();
    let data = [0, 1, 2].map(|c| {
        let pixels: Vec<F32> = img.data[c].iter().map(|&v| F32::new(v)).collect();
        let src = TypedImageRef::new(img.width as u32, img.height as u32, &pixels)
            .expect("buffer matches the image size");
        let mut dst = TypedImage::<F32>::new(width as u32, height as u32);
        resizer
            .resize_typed(&src, &mut dst, &options)
            .expect("sizes are positive");
        dst.pixels().iter().map(|p| p.0).collect()
    });
    Planes {
        width,
        height,
        data,
    }
}

/// 2-D correlation with a square `k`×`k` kernel, mirror padding (scipy's "mirror").
fn convolve(img: &Planes, kernel: &[f32], k: usize) -> Planes {
    let r = k / 2;
    let (w, h) = (img.width, img.height);
    let pw = w + 2 * r;
    let data = [0, 1, 2].map(|c| {
        let src = &img.data[c];
        // Padded copy, so the inner loop runs over contiguous rows.
        let mut padded = vec![0f32; pw * (h + 2 * r)];
        for py in 0..h + 2 * r {
            let sy = reflect(py as isize - r as isize, h as isize);
            for px in 0..pw {
                padded[py * pw + px] = src[sy * w + reflect(px as isize - r as isize, w as isize)];
            }
        }
        let mut out = vec![0f32; w * h];
        for y in 0..h {
            let row = &mut out[y * w..(y + 1) * w];
            for ky in 0..k {
                let src_row = &padded[(y + ky) * pw..(y + ky) * pw + pw];
                for kx in 0..k {
                    let wgt = kernel[ky * k + kx];
                    let s = &src_row[kx..kx + w];
                    for (o, v) in row.iter_mut().zip(s) {
                        *o += wgt * v;
                    }
                }
            }
        }
        out
    });
    Planes {
        width: w,
        height: h,
        data,
    }
}

/// BSRGAN's `fspecial('gaussian', k, sigma)`, normalised.
fn isotropic_kernel(k: usize, sigma: f32) -> Vec<f32> {
    let c = (k as f32 - 1.0) / 2.0;
    let mut out = Vec::with_capacity(k * k);
    for y in 0..k {
        for x in 0..k {
            let (dx, dy) = (x as f32 - c, y as f32 - c);
            out.push((-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp());
        }
    }
    normalise(out)
}

/// BSRGAN's `anisotropic_Gaussian(k, theta, l1, l2)`: covariance V·diag(l1, l2)·V⁻¹ with V the
/// rotation by theta.
fn anisotropic_kernel(k: usize, theta: f32, l1: f32, l2: f32) -> Vec<f32> {
    let (s, c) = theta.sin_cos();
    // Σ = R diag(l1, l2) Rᵀ; its inverse has eigenvalues 1/l1, 1/l2.
    let (i1, i2) = (1.0 / l1.max(1e-6), 1.0 / l2.max(1e-6));
    let a = c * c * i1 + s * s * i2;
    let b = c * s * (i1 - i2);
    let d = s * s * i1 + c * c * i2;
    let centre = (k as f32 - 1.0) / 2.0;
    let mut out = Vec::with_capacity(k * k);
    for y in 0..k {
        for x in 0..k {
            let (dx, dy) = (x as f32 - centre, y as f32 - centre);
            out.push((-0.5 * (a * dx * dx + 2.0 * b * dx * dy + d * dy * dy)).exp());
        }
    }
    normalise(out)
}

fn normalise(k: Vec<f32>) -> Vec<f32> {
    let sum: f32 = k.iter().sum();
    k.into_iter().map(|v| v / sum).collect()
}

fn add_blur(img: &Planes, sf: usize, rng: &mut impl Rng) -> Planes {
    let wd2 = 4.0 + sf as f32;
    let wd = 2.0 + 0.2 * sf as f32;
    let k = 2 * rng.gen_range(2..=11) + 3;
    let kernel = if rng.gen_bool(0.5) {
        let theta = rng.gen::<f32>() * std::f32::consts::PI;
        // Floored so a draw of ~0 does not make the covariance singular.
        let l1 = (wd2 * rng.gen::<f32>()).max(1e-3);
        let l2 = (wd2 * rng.gen::<f32>()).max(1e-3);
        anisotropic_kernel(k, theta, l1, l2)
    } else {
        isotropic_kernel(k, (wd * rng.gen::<f32>()).max(1e-3))
    };
    convolve(img, &kernel, k)
}

fn add_noise(img: &mut Planes, levels: [f32; 2], rng: &mut impl Rng) {
    let level = rng.gen_range(levels[0]..=levels[1]) / 255.0;
    let n = img.width * img.height;
    match rng_choice(rng) {
        NoiseKind::Colour => {
            for p in &mut img.data {
                for v in p.iter_mut() {
                    *v += level * standard_normal(rng);
                }
            }
        }
        NoiseKind::Grey => {
            for i in 0..n {
                let e = level * standard_normal(rng);
                for p in &mut img.data {
                    p[i] += e;
                }
            }
        }
        NoiseKind::Correlated => {
            // Covariance Uᵀ·D·U with D random diagonal and U a random rotation, scaled by σ².
            let d: [f32; 3] = [rng.gen(), rng.gen(), rng.gen()];
            let u = random_rotation(rng);
            // Cholesky-free sampling: x = Uᵀ · sqrt(D) · z.
            for i in 0..n {
                let z = [
                    standard_normal(rng) * d[0].sqrt(),
                    standard_normal(rng) * d[1].sqrt(),
                    standard_normal(rng) * d[2].sqrt(),
                ];
                for (c, p) in img.data.iter_mut().enumerate() {
                    let e = u[0][c] * z[0] + u[1][c] * z[1] + u[2][c] * z[2];
                    p[i] += level * e;
                }
            }
        }
    }
    img.clamp01();
}

enum NoiseKind {
    Colour,
    Grey,
    Correlated,
}

/// BSRGAN: colour noise with probability 0.4, grey 0.4, channel-correlated 0.2.
fn rng_choice(rng: &mut impl Rng) -> NoiseKind {
    let r: f32 = rng.gen();
    if r > 0.6 {
        NoiseKind::Colour
    } else if r < 0.4 {
        NoiseKind::Grey
    } else {
        NoiseKind::Correlated
    }
}

fn standard_normal(rng: &mut impl Rng) -> f32 {
    let (u1, u2): (f32, f32) = (rng.gen::<f32>().max(1e-12), rng.gen());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// A random 3×3 rotation (Gram–Schmidt on Gaussian vectors).
fn random_rotation(rng: &mut impl Rng) -> [[f32; 3]; 3] {
    let mut m = [[0f32; 3]; 3];
    for row in &mut m {
        for v in row.iter_mut() {
            *v = standard_normal(rng);
        }
    }
    for i in 0..3 {
        for j in 0..i {
            let prev = m[j];
            let dot: f32 = m[i].iter().zip(&prev).map(|(a, b)| a * b).sum();
            for (v, p) in m[i].iter_mut().zip(&prev) {
                *v -= dot * p;
            }
        }
        let norm = m[i].iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
        for v in &mut m[i] {
            *v /= norm;
        }
    }
    m
}

fn add_jpeg(img: &Planes, quality: [u8; 2], rng: &mut impl Rng) -> Planes {
    let q = rng.gen_range(quality[0]..=quality[1]);
    let rgb = img.to_rgb8();
    let mut buf = Vec::new();
    let encoded = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, q)
        .encode_image(&rgb)
        .is_ok();
    match image::load_from_memory(&buf) {
        Ok(decoded) if encoded => Planes::from_rgb8(&decoded.into_rgb8()),
        _ => img.clone(),
    }
}

/// Degrades `hq` to the low resolution (`hq` side / `cfg.scale`). Also returns `hq` cropped to a
/// multiple of the scale, aligned with the result.
pub fn bsr_degrade(hq: &Planes, cfg: &BsrConfig, rng: &mut impl Rng) -> (Planes, Planes) {
    let sf_target = cfg.scale;
    let (w, h) = (
        hq.width - hq.width % sf_target,
        hq.height - hq.height % sf_target,
    );
    let hq = hq.crop(0, 0, w, h);
    let (lw, lh) = (w / sf_target, h / sf_target);
    let mut img = hq.clone();
    let mut sf = sf_target;
    if sf == 4 && rng.gen_bool(cfg.scale2_prob) {
        img = resize(&img, w / 2, h / 2, random_interp(rng));
        img.clamp01();
        sf = 2;
    }
    let mut order: Vec<usize> = (0..6).collect();
    order.shuffle(rng);
    let (i2, i3) = (
        order.iter().position(|&o| o == 2).expect("present"),
        order.iter().position(|&o| o == 3).expect("present"),
    );
    if i2 > i3 {
        order.swap(i2, i3);
    }
    let (mut a, mut b) = (img.width, img.height);
    for step in order {
        match step {
            0 | 1 => img = add_blur(&img, sf, rng),
            2 => {
                (a, b) = (img.width, img.height);
                if rng.gen_bool(0.75) {
                    let sf1 = rng.gen_range(1.0..2.0 * sf as f64);
                    let (nw, nh) = ((a as f64 / sf1) as usize, (b as f64 / sf1) as usize);
                    img = resize(&img, nw, nh, random_interp(rng));
                } else {
                    let k = isotropic_kernel(25, rng.gen_range(0.1..0.6 * sf as f32));
                    let blurred = convolve(&img, &k, 25);
                    img = subsample(&blurred, sf);
                }
                img.clamp01();
            }
            3 => {
                img = resize(&img, a / sf, b / sf, random_interp(rng));
                img.clamp01();
            }
            4 => add_noise(&mut img, cfg.noise_levels, rng),
            _ => {
                if rng.gen_bool(cfg.jpeg_prob) {
                    img = add_jpeg(&img, cfg.jpeg_quality, rng);
                }
            }
        }
    }
    img = add_jpeg(&img, cfg.jpeg_quality, rng);
    if rng.gen_bool(cfg.second_round_prob) {
        img = add_blur(&img, 1, rng);
        add_noise(&mut img, cfg.noise_levels, rng);
        img = add_jpeg(&img, cfg.jpeg_quality, rng);
    }
    if (img.width, img.height) != (lw, lh) {
        img = resize(&img, lw, lh, Interp::Cubic);
        img.clamp01();
    }
    (img, hq)
}

/// Every `sf`-th pixel from the top-left (BSRGAN's `image[0::sf, 0::sf]`).
fn subsample(img: &Planes, sf: usize) -> Planes {
    let (w, h) = (img.width.div_ceil(sf), img.height.div_ceil(sf));
    let data = [0, 1, 2].map(|c| {
        let mut out = Vec::with_capacity(w * h);
        for y in (0..img.height).step_by(sf) {
            for x in (0..img.width).step_by(sf) {
                out.push(img.data[c][y * img.width + x]);
            }
        }
        out
    });
    Planes {
        width: w,
        height: h,
        data,
    }
}

/// Aligned random crops for upsampler training: a `lq_crop`² window of the low-resolution image
/// and the `lq_crop·scale`² window of the high-resolution image over the same region.
pub fn paired_random_crop(
    lq: &Planes,
    hq: &Planes,
    scale: usize,
    lq_crop: usize,
    rng: &mut impl Rng,
) -> Result<(Planes, Planes), String> {
    if hq.width != lq.width * scale || hq.height != lq.height * scale {
        return Err(format!(
            "high-resolution {}x{} is not {scale} x the low-resolution {}x{}",
            hq.width, hq.height, lq.width, lq.height
        ));
    }
    if lq_crop == 0 || lq_crop > lq.width || lq_crop > lq.height {
        return Err(format!(
            "crop {lq_crop} does not fit the low-resolution {}x{}",
            lq.width, lq.height
        ));
    }
    let left = rng.gen_range(0..=lq.width - lq_crop);
    let top = rng.gen_range(0..=lq.height - lq_crop);
    Ok((
        lq.crop(left, top, lq_crop, lq_crop),
        hq.crop(left * scale, top * scale, lq_crop * scale, lq_crop * scale),
    ))
}
