//! unCLIP's image manipulations (SPEC.md *Image manipulations*) with a trained decoder. An image's
//! bipartite latent is z_i, from the CLIP image encoder as `embed` computes it, and x_T, from
//! DDIM inversion of the image with the decoder conditioned on z_i; decoding (z_i, x_T) with DDIM
//! η = 0 reconstructs the image. From there:
//! - variations: the same latent decoded with η > 0 (details change, z_i's semantics stay);
//! - interpolations: z_i slerped from one image's to another's, x_T slerped with it (the ends
//!   reconstruct both images) or held at one random draw;
//! - text diffs: z_i slerped towards z_d = norm(z_t − z_t0), a target caption's text embedding
//!   less the image's own caption's, with x_T held;
//! - the PCA probe: z_i rebuilt from its first k principal components (fitted to stored
//!   embeddings), k growing, each decoded from the same random x_T.
//!
//! The decoder gets the empty caption throughout: a manipulation starts from an image, and the
//! decoder, trained with captions dropped half the time, decodes z_i alone.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use serde::Serialize;
use tch::{Kind, Tensor};
use unclip_data::images::{Crop, ImageTransform};
use unclip_decoder::{DecoderCondition, DecoderSampler};
use unclip_diffusion::embedding::{l2_normalize, slerp};
use unclip_diffusion::{ClipDenoised, FixedPoint, Respacing, SamplerConfig, SamplerName};
use unclip_train::precision::{autocast, AutocastGuard, Precision};

use unclip_clip::caption::image_embeddings;
use unclip_prior::codec::PrincipalComponents;
use unclip_prior::task::read_in_order;

use crate::pipeline::{check_sampler, in_chunks, Pipeline};

/// How [`Pipeline::manipulate`] inverts and decodes; [`Pipeline::manipulation_options`] gives
/// the defaults.
#[derive(Debug, Clone)]
pub struct ManipulationOptions {
    /// The DDIM steps both the inversion and the decoding walk (`sampler` must be `ddim`; its
    /// `eta` is ignored: variations take theirs from [`Manipulation::Variations`]). Clipping the
    /// x_0 estimates breaks the round trip, so the default is `none`.
    pub sampling: SamplerConfig,
    /// The decoder's guidance scale, in the inversion and the decoding alike (1: unguided).
    pub guidance: f64,
    /// Fixed-point iterations per inversion step (none: the classic inversion); each is one more
    /// model call per step and brings the round trip closer to exact.
    pub inversion: FixedPoint,
    /// One per upsampler, in order.
    pub upsampler_sampling: Vec<SamplerConfig>,
    /// Seed of all noise: variations' η noise, interpolations' held x_T, the upsamplers'.
    pub seed: i64,
    /// Images inverted or decoded at once.
    pub batch_size: usize,
    /// `auto` is fp32 here: the inversion's fixed point and the round trip need its precision
    /// (bf16 and fp16 are taken as asked).
    pub precision: Precision,
}

/// Whether an interpolation's x_T follows the two images' inverted latents or is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LatentPath {
    /// x_Tθ = slerp(x_T1, x_T2, θ): one trajectory whose ends reconstruct both images.
    Slerp,
    /// One random x_T for the whole trajectory: the ends no longer reconstruct the images.
    Fixed,
}

/// One of the paper's manipulations, over one or more images (image files of any size; each is
/// centre-cropped and resized as the decoder's and the CLIP's training data were).
#[derive(Debug, Clone)]
pub enum Manipulation {
    /// Per image: the image, its reconstruction (η = 0), then `count` decodings with η = `eta`.
    Variations {
        images: Vec<PathBuf>,
        count: usize,
        eta: f64,
    },
    /// Per pair: the first image, `frames` decodings at θ = 0 … 1, the second image.
    Interpolations {
        pairs: Vec<(PathBuf, PathBuf)>,
        frames: usize,
        latent: LatentPath,
    },
    /// Per image with its caption `from` and a target caption `to`: the image, then `frames`
    /// decodings at θ = 0 … `max_theta` (the paper: 0.25–0.5); θ = 0 is the reconstruction.
    TextDiffs {
        images: Vec<PathBuf>,
        from: Vec<String>,
        to: Vec<String>,
        frames: usize,
        max_theta: f64,
    },
    /// Per image: the image, then decodings of z_i rebuilt from its first k principal components
    /// for each k of `components` (none given: 1, 2, 4, … below the embedding's width), then of
    /// z_i itself, all from one random x_T. The components are fitted to the first `samples`
    /// image embeddings of the embedding shards `embeddings`.
    PcaProbe {
        images: Vec<PathBuf>,
        embeddings: String,
        samples: usize,
        components: Vec<usize>,
    },
}

/// One image of a [`ManipulatedRow`], described.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    /// `input`, `reconstruction`, `variation`, `frame`, `components`.
    pub kind: &'static str,
    /// The input file (`input` columns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// The slerp weight of a frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub theta: Option<f64>,
    /// DDIM's η for a decoded image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// The PCA probe: the principal components z_i was rebuilt from, and the fraction of the
    /// embeddings' variance they hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub components: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explained_variance: Option<f64>,
    /// cos(CLIP image embedding of the (final) image, the embedding it was decoded from; an
    /// input's own z_i for an input).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_image: Option<f64>,
    /// cos(CLIP image embedding of the image, each input's z_i), in the row's input order (one
    /// input but for interpolations).
    pub clip_inputs: Vec<f64>,
    /// Text diffs: cos(CLIP image embedding of the image, the target caption's z_t).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_target: Option<f64>,
}

/// One row of the output grid.
pub struct ManipulatedRow {
    /// [K, 3, R, R] in [-1, 1] at the pipeline's final resolution.
    pub images: Tensor,
    pub columns: Vec<Column>,
    /// [K', D]: the image embedding each decoded (non-input) column was decoded from, in order.
    pub decoded_embeds: Tensor,
    /// Root mean square error (pixels in [0, 1]) of each input's reconstruction at the decoder's
    /// resolution: how exact the round trip through (z_i, x_T) is. Interpolations with held x_T
    /// have none.
    pub reconstruction_rmse: Vec<f64>,
    /// Text diffs: the two captions.
    pub captions: Option<(String, String)>,
}

/// The images read for a manipulation.
pub struct InputImages {
    /// [N, 3, r, r] in [-1, 1] at the decoder's resolution: what is inverted.
    pub pixels: Tensor,
    /// [N, 3, R, R] in [-1, 1] at the pipeline's final resolution: what the grid shows.
    pub display: Tensor,
    /// [N, D]: the CLIP image embeddings z_i.
    pub image_embeds: Tensor,
}

/// θ_k = max · k / (frames − 1), k = 0 … frames − 1.
pub fn thetas(frames: usize, max: f64) -> Vec<f64> {
    (0..frames)
        .map(|k| max * k as f64 / (frames - 1).max(1) as f64)
        .collect()
}

/// The paper's text-diff direction z_d = norm(z_t − z_t0) per row ([N, D] each).
pub fn text_diff_direction(from: &Tensor, to: &Tensor) -> Result<Tensor> {
    Ok(l2_normalize(&(to - from))?)
}

/// Row r of `a` [N, ...] slerped towards row r of `b` at every θ: [N · F, ...] row-major.
fn slerp_rows(a: &Tensor, b: &Tensor, thetas: &[f64]) -> Result<Tensor> {
    let (n, f) = (a.size()[0], thetas.len() as i64);
    let shape = a.size();
    let flat = |x: &Tensor| {
        x.flatten(1, -1)
            .repeat_interleave_self_int(f, 0, None)
            .to_kind(Kind::Double)
    };
    let theta = Tensor::from_slice(thetas).to_device(a.device()).repeat([n]);
    let mut out_shape = shape.clone();
    out_shape[0] = n * f;
    Ok(slerp(&flat(a), &flat(b), &theta)?
        .to_kind(Kind::Float)
        .view(out_shape.as_slice()))
}

/// The cosine of each pair of matching rows.
fn row_cosines(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let c = (l2_normalize(a)? * l2_normalize(b)?).sum_dim_intlist(-1, false, Kind::Double);
    Ok(Vec::<f64>::try_from(&c.to_device(tch::Device::Cpu))?)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading image {}", path.display()))
}

impl Pipeline {
    /// DDIM over 50 steps strided as DDIM's paper (`ddim50`: 0, 20, …, 980 of 1000, short of the
    /// last steps where an ε-model's inversion is ill-conditioned; the decoder config's steps when
    /// its process has no such spacing), no clipping, unguided, up to 10 fixed-point iterations
    /// per inversion step until x moves by at most 1e-4, each upsampler's config sampler; seed 0,
    /// 16 at once, precision `auto` (fp32).
    pub fn manipulation_options(&self) -> ManipulationOptions {
        let d = &self.decoder.cfg.decoder;
        let ddim50 = Respacing::Spec("ddim50".into());
        let steps = if ddim50.timesteps(d.diffusion.timesteps).is_ok() {
            ddim50
        } else {
            d.sampling.steps.clone()
        };
        ManipulationOptions {
            sampling: SamplerConfig {
                sampler: SamplerName::Ddim,
                steps,
                eta: None,
                clip: ClipDenoised::None,
            },
            guidance: 1.0,
            inversion: FixedPoint {
                max_iters: 10,
                tolerance: 1e-4,
            },
            upsampler_sampling: self.upsampler_samplings(),
            seed: 0,
            batch_size: 16,
            precision: Precision::Auto,
        }
    }

    /// Checks `o` and `m` against the runs before any work; errors name the option.
    pub fn check_manipulation(&self, m: &Manipulation, o: &ManipulationOptions) -> Result<()> {
        self.expects_image_embeddings("image manipulations (of the images' z_i)")?;
        ensure!(
            o.sampling.sampler == SamplerName::Ddim,
            "decoder sampling: manipulations walk DDIM (what the inversion inverts), not {:?}",
            o.sampling.sampler
        );
        ensure!(
            !self.decoder.model.self_condition,
            "the decoder run {} is self-conditioned (decoder.model.self_condition): its DDIM \
             inversion is not defined",
            self.decoder.source
        );
        ensure!(o.batch_size >= 1, "batch size must be at least 1");
        ensure!(
            o.inversion.tolerance.is_finite() && o.inversion.tolerance >= 0.0,
            "inversion tolerance must be finite and >= 0, got {}",
            o.inversion.tolerance
        );
        ensure!(
            o.guidance.is_finite() && o.guidance >= 0.0,
            "decoder guidance must be finite and >= 0, got {}",
            o.guidance
        );
        check_sampler(
            "decoder",
            &o.sampling,
            self.decoder.cfg.decoder.diffusion.timesteps,
        )?;
        self.check_upsampler_samplings(&o.upsampler_sampling)?;
        let files: Vec<&PathBuf> = match m {
            Manipulation::Variations { images, count, eta } => {
                ensure!(*count >= 1, "variations: count must be at least 1");
                ensure!(
                    eta.is_finite() && *eta >= 0.0,
                    "variations: eta must be finite and >= 0, got {eta}"
                );
                images.iter().collect()
            }
            Manipulation::Interpolations { pairs, frames, .. } => {
                ensure!(*frames >= 2, "interpolations: frames must be at least 2");
                pairs.iter().flat_map(|(a, b)| [a, b]).collect()
            }
            Manipulation::TextDiffs {
                images,
                from,
                to,
                frames,
                max_theta,
            } => {
                ensure!(*frames >= 2, "text diffs: frames must be at least 2");
                ensure!(
                    *max_theta > 0.0 && *max_theta <= 1.0,
                    "text diffs: the largest theta must be in (0, 1] (the paper: 0.25–0.5), got {max_theta}"
                );
                ensure!(
                    from.len() == images.len() && to.len() == images.len(),
                    "text diffs: {} images, {} captions of them and {} target captions: give one of each per image",
                    images.len(),
                    from.len(),
                    to.len()
                );
                images.iter().collect()
            }
            Manipulation::PcaProbe {
                images,
                samples,
                components,
                ..
            } => {
                let dim = self.encoder.embed_dim() as usize;
                for &k in components {
                    ensure!(
                        (1..=dim).contains(&k),
                        "the PCA probe: {k} components of a {dim}-wide embedding"
                    );
                }
                ensure!(
                    *samples >= 2,
                    "the PCA probe: fitting principal components needs at least 2 embeddings, \
                     got {samples}"
                );
                images.iter().collect()
            }
        };
        ensure!(!files.is_empty(), "no images to manipulate");
        for f in files {
            ensure!(f.is_file(), "image {}: no such file", f.display());
        }
        Ok(())
    }

    /// The image files, centre-cropped and resized as the decoder's training images (no flip),
    /// at the final resolution for display, and embedded by the CLIP as `embed` embeds them.
    pub fn read_images(&self, paths: &[PathBuf], batch_size: usize) -> Result<InputImages> {
        let bytes: Vec<Vec<u8>> = paths.iter().map(|p| read_file(p)).collect::<Result<_>>()?;
        let encoded: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let device = self.device();
        let transform = |t: &ImageTransform| -> Result<Vec<Vec<f32>>> {
            t.apply_all(&encoded)
                .into_iter()
                .zip(paths)
                .map(|(px, path)| px.map_err(|e| anyhow!("image {}: {e}", path.display())))
                .collect()
        };
        let stack = |t: &ImageTransform| -> Result<Tensor> {
            let r = i64::from(t.resolution);
            let flat: Vec<f32> = transform(t)?.into_iter().flatten().collect();
            Ok(Tensor::from_slice(&flat)
                .view([paths.len() as i64, 3, r, r])
                .to_device(device))
        };
        // As the decoder's training images, but deterministic: centred, unflipped.
        let mut decoder_image = self.decoder.cfg.data.image.clone();
        decoder_image.random_flip = false;
        decoder_image.crop = Crop::Center;
        let pixels = stack(&decoder_image)?;
        // Without upsamplers the grid shows the decoder's own input.
        let display = if self.upsamplers.is_empty() {
            pixels.shallow_clone()
        } else {
            let mut display = decoder_image.clone();
            display.resolution = self.resolution() as u32;
            stack(&display)?
        };
        let clip = &self.encoder.clip;
        Ok(InputImages {
            pixels,
            display,
            image_embeds: clip.embed_transformed(&transform(&clip.image)?, batch_size)?,
        })
    }

    /// Decoder conditions of `image_embeds` rows with the empty caption.
    fn image_only_condition(&self, image_embeds: &Tensor) -> Result<DecoderCondition> {
        let zeros = Tensor::zeros([image_embeds.size()[0]], (Kind::Int64, self.device()));
        Ok(DecoderCondition {
            image_embeds: image_embeds.shallow_clone(),
            text: self.null.index_select(&zeros)?,
        })
    }

    /// x_T [N, 3, r, r] of each image by DDIM inversion with the decoder conditioned on its z_i.
    pub fn invert(&self, inputs: &InputImages, o: &ManipulationOptions) -> Result<Tensor> {
        let d = &self.decoder.cfg.decoder;
        let sampler = DecoderSampler::new(&self.decoder.model, &d.diffusion, &o.sampling)?;
        let _precision = self.autocast(o.precision);
        in_chunks(inputs.pixels.size()[0], o.batch_size, |start, len| {
            let cond = self.image_only_condition(&inputs.image_embeds.narrow(0, start, len))?;
            sampler.invert(
                &cond,
                &self.null,
                o.guidance,
                &inputs.pixels.narrow(0, start, len),
                o.inversion,
            )
        })
    }

    /// DDIM with η = `eta` from the latents x_T [N, 3, r, r] for `image_embeds` [N, D]: images in
    /// [-1, 1] at the decoder's resolution. η's noise is drawn from `o.seed`.
    pub fn decode_latents(
        &self,
        image_embeds: &Tensor,
        latents: &Tensor,
        eta: f64,
        o: &ManipulationOptions,
    ) -> Result<Tensor> {
        let d = &self.decoder.cfg.decoder;
        let sampling = SamplerConfig {
            eta: Some(eta),
            ..o.sampling.clone()
        };
        let sampler = DecoderSampler::new(&self.decoder.model, &d.diffusion, &sampling)?;
        let _precision = self.autocast(o.precision);
        tch::manual_seed(o.seed);
        in_chunks(latents.size()[0], o.batch_size, |start, len| {
            let cond = self.image_only_condition(&image_embeds.narrow(0, start, len))?;
            sampler.sample(&cond, &self.null, o.guidance, latents.narrow(0, start, len))
        })
    }

    /// `images` through every upsampler, in order (none: unchanged).
    fn upsample_images(&self, images: Tensor, o: &ManipulationOptions) -> Result<Tensor> {
        let _precision = self.autocast(o.precision);
        self.upsample_all(images, &o.upsampler_sampling, Some(o.seed), o.batch_size)
    }

    fn autocast(&self, precision: Precision) -> Option<AutocastGuard> {
        autocast(self.device(), precision)
    }

    /// The CLIP image embeddings of images in [-1, 1] (any size).
    fn clip_embeds(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.encoder.clip.embed_images(images)?.to_kind(Kind::Float))
    }

    /// Runs `m`: one row per image (variations, text diffs) or pair (interpolations).
    pub fn manipulate(
        &self,
        m: &Manipulation,
        o: &ManipulationOptions,
    ) -> Result<Vec<ManipulatedRow>> {
        self.check_manipulation(m, o)?;
        match m {
            Manipulation::Variations { images, count, eta } => {
                self.variations(images, *count, *eta, o)
            }
            Manipulation::Interpolations {
                pairs,
                frames,
                latent,
            } => self.interpolations(pairs, *frames, *latent, o),
            Manipulation::TextDiffs {
                images,
                from,
                to,
                frames,
                max_theta,
            } => self.text_diffs(images, from, to, *frames, *max_theta, o),
            Manipulation::PcaProbe {
                images,
                embeddings,
                samples,
                components,
            } => {
                let components = if components.is_empty() {
                    let dim = self.encoder.embed_dim() as usize;
                    std::iter::successors(Some(1usize), |k| Some(k * 2))
                        .take_while(|&k| k < dim)
                        .collect()
                } else {
                    components.clone()
                };
                self.pca_probe(images, embeddings, *samples, &components, o)
            }
        }
    }

    fn pca_probe(
        &self,
        files: &[PathBuf],
        embeddings: &str,
        samples: usize,
        components: &[usize],
        o: &ManipulationOptions,
    ) -> Result<Vec<ManipulatedRow>> {
        let stored = read_in_order(embeddings, samples)
            .with_context(|| format!("the PCA probe's embeddings {embeddings}"))?;
        self.decoder
            .cfg
            .decoder
            .clip_embeddings
            .check(&stored, "decoder.clip_embeddings")
            .map_err(|e| anyhow!("the PCA probe's embeddings {embeddings}: {e}"))?;
        let stored = image_embeddings(&stored, self.device());
        let dim = self.encoder.embed_dim();
        ensure!(
            stored.size()[1] == dim,
            "the PCA probe's embeddings {embeddings} are {}-wide, the decoder's CLIP {dim}-wide",
            stored.size()[1]
        );
        // Fewer embeddings than dimensions still give a whole basis; the components past their
        // rank hold no variance, which the explained fractions show.
        ensure!(
            stored.size()[0] >= 2,
            "the PCA probe's embeddings {embeddings}: one readable sample, at least 2 needed"
        );
        let pca = PrincipalComponents::fit(&stored)?;
        let inputs = self.read_images(files, o.batch_size)?;
        let z = &inputs.image_embeds;
        let (n, f) = (files.len() as i64, components.len() as i64 + 1);
        // Per image: z_i from k components for each k (at z_i's norm: 1, or a raw embedding's),
        // then z_i itself.
        let norm = z.norm_scalaropt_dim(2, [-1], true);
        let mut per_k: Vec<Tensor> = components
            .iter()
            .map(|&k| {
                Ok((l2_normalize(&pca.reconstruct(z, k as i64))? * &norm).to_kind(Kind::Float))
            })
            .collect::<Result<_>>()?;
        per_k.push(z.shallow_clone());
        let z_frames = Tensor::stack(&per_k, 1).flatten(0, 1);
        tch::manual_seed(o.seed);
        let r = self.decoder.resolution();
        let held = Tensor::randn([n, 3, r, r], (Kind::Float, self.device()));
        let rows =
            Tensor::arange(n, (Kind::Int64, self.device())).repeat_interleave_self_int(f, 0, None);
        let decoded = self.decode_latents(&z_frames, &held.index_select(0, &rows), 0.0, o)?;
        let decoded = self.upsample_images(decoded, o)?;
        let (zd, zx) = (
            self.clip_embeds(&decoded)?,
            self.clip_embeds(&inputs.display)?,
        );
        let cos_frames = row_cosines(&zd, &z_frames)?;
        let cos_input = row_cosines(&zd, &z.index_select(0, &rows))?;
        let cos_x = row_cosines(&zx, z)?;
        let mut out = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let ii = i as i64;
            let mut columns = vec![Column::input(file, cos_x[i])];
            for (j, k) in components
                .iter()
                .map(|&k| Some(k))
                .chain([None])
                .enumerate()
            {
                let row = i * f as usize + j;
                columns.push(Column {
                    components: Some(k.unwrap_or(dim as usize)),
                    explained_variance: Some(k.map_or(1.0, |k| pca.explained(k as i64))),
                    clip_inputs: vec![cos_input[row]],
                    ..Column::decoded("components", None, Some(0.0), cos_frames[row])
                });
            }
            out.push(ManipulatedRow {
                images: input_then(&inputs.display, ii, &decoded.narrow(0, ii * f, f))?,
                columns,
                decoded_embeds: z_frames.narrow(0, ii * f, f),
                reconstruction_rmse: Vec::new(),
                captions: None,
            });
        }
        Ok(out)
    }

    fn variations(
        &self,
        files: &[PathBuf],
        count: usize,
        eta: f64,
        o: &ManipulationOptions,
    ) -> Result<Vec<ManipulatedRow>> {
        let inputs = self.read_images(files, o.batch_size)?;
        let latents = self.invert(&inputs, o)?;
        let z = &inputs.image_embeds;
        let recon = self.decode_latents(z, &latents, 0.0, o)?;
        let rmse = rmse_rows(&recon, &inputs.pixels)?;
        let k = count as i64;
        let rows = Tensor::arange(files.len() as i64, (Kind::Int64, self.device()))
            .repeat_interleave_self_int(k, 0, None);
        let z_var = z.index_select(0, &rows);
        let varied = self.decode_latents(&z_var, &latents.index_select(0, &rows), eta, o)?;
        let recon = self.upsample_images(recon, o)?;
        let varied = self.upsample_images(varied, o)?;
        let (zr, zv, zx) = (
            self.clip_embeds(&recon)?,
            self.clip_embeds(&varied)?,
            self.clip_embeds(&inputs.display)?,
        );
        let (cos_r, cos_v, cos_x) = (
            row_cosines(&zr, z)?,
            row_cosines(&zv, &z_var)?,
            row_cosines(&zx, z)?,
        );
        let mut out = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let ii = i as i64;
            // Every decoded column decodes the input's own z_i.
            let own = |kind, eta, cos: f64| Column {
                clip_inputs: vec![cos],
                ..Column::decoded(kind, None, Some(eta), cos)
            };
            let mut columns = vec![
                Column::input(file, cos_x[i]),
                own("reconstruction", 0.0, cos_r[i]),
            ];
            for j in 0..count {
                columns.push(own("variation", eta, cos_v[i * count + j]));
            }
            out.push(ManipulatedRow {
                images: Tensor::f_cat(
                    &[
                        inputs.display.narrow(0, ii, 1),
                        recon.narrow(0, ii, 1),
                        varied.narrow(0, ii * k, k),
                    ],
                    0,
                )?,
                columns,
                decoded_embeds: Tensor::f_cat(
                    &[z.narrow(0, ii, 1), z_var.narrow(0, ii * k, k)],
                    0,
                )?,
                reconstruction_rmse: vec![rmse[i]],
                captions: None,
            });
        }
        Ok(out)
    }

    fn interpolations(
        &self,
        pairs: &[(PathBuf, PathBuf)],
        frames: usize,
        latent: LatentPath,
        o: &ManipulationOptions,
    ) -> Result<Vec<ManipulatedRow>> {
        let files: Vec<PathBuf> = pairs
            .iter()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect();
        let inputs = self.read_images(&files, o.batch_size)?;
        let (n, f) = (pairs.len() as i64, frames as i64);
        let even = Tensor::arange_start_step(0, 2 * n, 2, (Kind::Int64, self.device()));
        let odd = &even + 1;
        let z = &inputs.image_embeds;
        let (za, zb) = (z.index_select(0, &even), z.index_select(0, &odd));
        let theta = thetas(frames, 1.0);
        let z_frames = slerp_rows(&za, &zb, &theta)?;
        let (x_frames, rmse) = match latent {
            LatentPath::Slerp => {
                let latents = self.invert(&inputs, o)?;
                let (xa, xb) = (
                    latents.index_select(0, &even),
                    latents.index_select(0, &odd),
                );
                let x_frames = slerp_rows(&xa, &xb, &theta)?;
                // The ends (θ = 0, 1) are the two images' reconstructions.
                let ends = Tensor::stack(
                    &[
                        Tensor::arange(n, (Kind::Int64, self.device())) * f,
                        Tensor::arange(n, (Kind::Int64, self.device())) * f + (f - 1),
                    ],
                    1,
                )
                .flatten(0, 1);
                (x_frames, Some(ends))
            }
            LatentPath::Fixed => {
                tch::manual_seed(o.seed);
                let r = self.decoder.resolution();
                let held = Tensor::randn([n, 3, r, r], (Kind::Float, self.device()));
                let rows = Tensor::arange(n, (Kind::Int64, self.device()))
                    .repeat_interleave_self_int(f, 0, None);
                (held.index_select(0, &rows), None)
            }
        };
        let decoded = self.decode_latents(&z_frames, &x_frames, 0.0, o)?;
        let rmse = match rmse {
            Some(ends) => rmse_rows(&decoded.index_select(0, &ends), &inputs.pixels)?,
            None => Vec::new(),
        };
        let decoded = self.upsample_images(decoded, o)?;
        let (zd, zx) = (
            self.clip_embeds(&decoded)?,
            self.clip_embeds(&inputs.display)?,
        );
        let cos_frames = row_cosines(&zd, &z_frames)?;
        let cos_x = row_cosines(&zx, z)?;
        let mut out = Vec::new();
        for (p, (a, b)) in pairs.iter().enumerate() {
            let pp = p as i64;
            let ends = [z.get(2 * pp), z.get(2 * pp + 1)];
            let to_ends = |emb: &Tensor| -> Result<Vec<f64>> {
                ends.iter()
                    .map(|e| Ok(row_cosines(&emb.unsqueeze(0), &e.unsqueeze(0))?[0]))
                    .collect()
            };
            let mut columns = vec![Column {
                clip_inputs: to_ends(&zx.get(2 * pp))?,
                ..Column::input(a, cos_x[2 * p])
            }];
            for (k, &t) in theta.iter().enumerate() {
                let row = pp * f + k as i64;
                columns.push(Column {
                    clip_inputs: to_ends(&zd.get(row))?,
                    ..Column::decoded("frame", Some(t), Some(0.0), cos_frames[row as usize])
                });
            }
            columns.push(Column {
                clip_inputs: to_ends(&zx.get(2 * pp + 1))?,
                ..Column::input(b, cos_x[2 * p + 1])
            });
            out.push(ManipulatedRow {
                images: Tensor::f_cat(
                    &[
                        inputs.display.narrow(0, 2 * pp, 1),
                        decoded.narrow(0, pp * f, f),
                        inputs.display.narrow(0, 2 * pp + 1, 1),
                    ],
                    0,
                )?,
                columns,
                decoded_embeds: z_frames.narrow(0, pp * f, f),
                reconstruction_rmse: rmse
                    .get(2 * p..2 * p + 2)
                    .map(<[f64]>::to_vec)
                    .unwrap_or_default(),
                captions: None,
            });
        }
        Ok(out)
    }

    fn text_diffs(
        &self,
        files: &[PathBuf],
        from: &[String],
        to: &[String],
        frames: usize,
        max_theta: f64,
        o: &ManipulationOptions,
    ) -> Result<Vec<ManipulatedRow>> {
        let inputs = self.read_images(files, o.batch_size)?;
        let latents = self.invert(&inputs, o)?;
        let z = &inputs.image_embeds;
        let z_t0 = self.encoder.encode(from)?.text_embeds.to_kind(Kind::Float);
        let z_t = self.encoder.encode(to)?.text_embeds.to_kind(Kind::Float);
        // At z_i's norm, so the slerp keeps it (1 for normalised embeddings; raw ones their own).
        let z_d = text_diff_direction(&z_t0, &z_t)? * z.norm_scalaropt_dim(2, [-1], true);
        let theta = thetas(frames, max_theta);
        let (n, f) = (files.len() as i64, frames as i64);
        let z_frames = slerp_rows(z, &z_d, &theta)?;
        let rows =
            Tensor::arange(n, (Kind::Int64, self.device())).repeat_interleave_self_int(f, 0, None);
        let decoded = self.decode_latents(&z_frames, &latents.index_select(0, &rows), 0.0, o)?;
        let firsts = Tensor::arange(n, (Kind::Int64, self.device())) * f;
        let rmse = rmse_rows(&decoded.index_select(0, &firsts), &inputs.pixels)?;
        let decoded = self.upsample_images(decoded, o)?;
        let (zd, zx) = (
            self.clip_embeds(&decoded)?,
            self.clip_embeds(&inputs.display)?,
        );
        let cos_frames = row_cosines(&zd, &z_frames)?;
        let cos_target = row_cosines(&zd, &z_t.index_select(0, &rows))?;
        let cos_input = row_cosines(&zd, &z.index_select(0, &rows))?;
        let cos_x = row_cosines(&zx, z)?;
        let cos_x_target = row_cosines(&zx, &z_t)?;
        let mut out = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let ii = i as i64;
            let mut columns = vec![Column {
                clip_target: Some(cos_x_target[i]),
                ..Column::input(file, cos_x[i])
            }];
            for (k, &t) in theta.iter().enumerate() {
                let row = i * frames + k;
                columns.push(Column {
                    clip_inputs: vec![cos_input[row]],
                    clip_target: Some(cos_target[row]),
                    ..Column::decoded("frame", Some(t), Some(0.0), cos_frames[row])
                });
            }
            out.push(ManipulatedRow {
                images: input_then(&inputs.display, ii, &decoded.narrow(0, ii * f, f))?,
                columns,
                decoded_embeds: z_frames.narrow(0, ii * f, f),
                reconstruction_rmse: vec![rmse[i]],
                captions: Some((from[i].clone(), to[i].clone())),
            });
        }
        Ok(out)
    }
}

impl Column {
    fn input(file: &Path, clip_image: f64) -> Self {
        Self {
            kind: "input",
            source: Some(file.to_path_buf()),
            theta: None,
            eta: None,
            components: None,
            explained_variance: None,
            clip_image: Some(clip_image),
            clip_inputs: vec![clip_image],
            clip_target: None,
        }
    }

    fn decoded(kind: &'static str, theta: Option<f64>, eta: Option<f64>, clip_image: f64) -> Self {
        Self {
            kind,
            source: None,
            theta,
            eta,
            components: None,
            explained_variance: None,
            clip_image: Some(clip_image),
            clip_inputs: Vec::new(),
            clip_target: None,
        }
    }
}

/// Input image `i` of `display`, then the images `decoded`.
fn input_then(display: &Tensor, i: i64, decoded: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_cat(&[&display.narrow(0, i, 1), decoded], 0)?)
}

/// Per row, the RMSE between two image batches in [-1, 1], measured on the [0, 1] pixel scale.
fn rmse_rows(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)) * 0.5;
    let mse = d.square().flatten(1, -1).mean_dim(-1, false, Kind::Double);
    Ok(Vec::<f64>::try_from(
        &mse.sqrt().to_device(tch::Device::Cpu),
    )?)
}
