//! What `evaluate` measures on held-out captioned images: the prior's samples against the true
//! CLIP image embeddings (SPEC.md's prior evaluation), and the pipeline's images by CLIP score,
//! caption retrieval, the Fréchet distance of their CLIP embeddings to the real images'
//! (FD_CLIP) and, on shapes scenes, the model-free shape count.

use std::path::Path;
pub use unclip_clip::metrics::{precision_recall, Manifold, NEAREST_K};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use unclip_clip::caption::{CaptionEncoder, TextCondition};
use unclip_clip::load::LoadedClip;
use unclip_data::reader::{ReaderConfig, ShardReader};
use unclip_data::shape_score::{score_scene, ShapeTally};
use unclip_data::shapes::Scene;
use unclip_diffusion::embedding::l2_normalize;

use crate::pipeline::{image_path, Pipeline, PipelineOptions};

/// The held-out captioned images, embedded by the CLIP as `embed` embeds them.
pub struct HeldOutImages {
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    /// [N, D]: the real images' CLIP image embeddings z_i.
    pub image_embeds: Tensor,
    /// Each sample's scene when every sample's `.json` reads as a shapes scene.
    pub scenes: Option<Vec<Scene>>,
    /// The real images' shapes counted (the scorer's ceiling), with `scenes`.
    pub real_shapes: Option<ShapeTally>,
    /// Samples skipped as unreadable or undecodable.
    pub skipped: u64,
}

impl HeldOutImages {
    /// The first `limit` samples of the shards `pattern` (in order), their images embedded by
    /// `clip` `batch_size` at a time. Unreadable samples are skipped and counted.
    pub fn read(pattern: &str, limit: usize, clip: &LoadedClip, batch_size: usize) -> Result<Self> {
        let reader = ShardReader::new(&ReaderConfig::in_order(pattern), 0)
            .with_context(|| format!("--data {pattern}"))?;
        let raw: Vec<_> = reader.iter().take(limit).collect();
        let mut skipped = reader.skipped();
        let encoded: Vec<&[u8]> = raw.iter().map(|s| s.image.as_slice()).collect();
        let decoded = clip.image.apply_all(&encoded);
        let (mut keys, mut captions, mut pixels, mut kept) = (vec![], vec![], vec![], vec![]);
        for (sample, px) in raw.iter().zip(decoded) {
            match px {
                Ok(px) => {
                    keys.push(sample.key.clone());
                    captions.push(sample.caption.clone());
                    pixels.push(px);
                    kept.push(sample);
                }
                Err(e) => {
                    eprintln!("--data {pattern}: sample {} skipped: {e}", sample.key);
                    skipped += 1;
                }
            }
        }
        ensure!(
            !kept.is_empty(),
            "--data {pattern}: no readable captioned images ({skipped} skipped)"
        );
        let scenes: Option<Vec<Scene>> = kept
            .iter()
            .map(|s| {
                s.metadata
                    .clone()
                    .and_then(|v| serde_json::from_value::<Scene>(v).ok())
            })
            .collect();
        let real_shapes = match &scenes {
            Some(scenes) => {
                let mut tally = ShapeTally::default();
                for (sample, scene) in kept.iter().zip(scenes) {
                    let img = image::load_from_memory(&sample.image)
                        .with_context(|| format!("--data {pattern}: sample {}", sample.key))?;
                    tally.add(&score_scene(&img.to_rgb8(), scene));
                }
                Some(tally)
            }
            None => None,
        };
        Ok(Self {
            keys,
            captions,
            image_embeds: clip.embed_transformed(&pixels, batch_size)?,
            scenes,
            real_shapes,
            skipped,
        })
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// The distinct captions, in first-seen order, and each sample's index among them.
    pub fn distinct_captions(&self) -> (Vec<String>, Vec<i64>) {
        let mut distinct: Vec<String> = Vec::new();
        let own = self
            .captions
            .iter()
            .map(|c| match distinct.iter().position(|d| d == c) {
                Some(i) => i as i64,
                None => {
                    distinct.push(c.clone());
                    distinct.len() as i64 - 1
                }
            })
            .collect();
        (distinct, own)
    }
}

/// The Fréchet distance between Gaussians fitted to the rows of `a` and of `b` ([N, D] each,
/// N ≥ 2; unbiased covariances, as pytorch-fid): ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa Σb)^½.
pub fn frechet_distance(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (mu_a, sigma_a) = moments(a)?;
    let (mu_b, sigma_b) = moments(b)?;
    frechet_distance_of(&mu_a, &sigma_a, &mu_b, &sigma_b)
}

/// Mean [D] and unbiased covariance [D, D] of the rows of `x`, in float64.
pub fn moments(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.to_device(Device::Cpu).to_kind(Kind::Double);
    let n = x.size()[0];
    ensure!(n >= 2, "a covariance needs at least 2 samples, got {n}");
    let mu = x.mean_dim(0, false, Kind::Double);
    let centred = &x - &mu;
    let sigma = centred.tr().matmul(&centred) / (n - 1) as f64;
    Ok((mu, sigma))
}

/// The Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (float64, CPU).
pub fn frechet_distance_of(
    mu_a: &Tensor,
    sigma_a: &Tensor,
    mu_b: &Tensor,
    sigma_b: &Tensor,
) -> Result<f64> {
    // tr (Σa Σb)^½ = Σ √eig(Σa^½ Σb Σa^½): a symmetric eigenproblem, no complex sqrtm.
    let (lambda, v) = sigma_a.f_linalg_eigh("L")?;
    let root_a = (&v * lambda.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&v.tr());
    let m = root_a.matmul(sigma_b).matmul(&root_a);
    let m = (&m + m.tr()) * 0.5;
    let tr_root = m
        .f_linalg_eigvalsh("L")?
        .clamp_min(0.0)
        .sqrt()
        .sum(Kind::Double)
        .double_value(&[]);
    let mean_term = (mu_a - mu_b).square().sum(Kind::Double).double_value(&[]);
    let traces = sigma_a.trace().double_value(&[]) + sigma_b.trace().double_value(&[]);
    Ok(mean_term + traces - 2.0 * tr_root)
}

/// The fraction of rows of `image_embeds` [N, D] whose most similar row of `caption_embeds`
/// [C, D] is their own (`own` [N], int64): CLIP's top-1 caption retrieval.
pub fn caption_top1(image_embeds: &Tensor, caption_embeds: &Tensor, own: &Tensor) -> Result<f64> {
    let sim = unit(image_embeds)?.f_matmul(&unit(caption_embeds)?.tr())?;
    let hit = sim.argmax(1, false).eq_tensor(&own.to_device(sim.device()));
    Ok(hit
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]))
}

/// Rows scaled to norm 1 (the embeddings may be raw: `clip_embeddings: raw`), in float32.
pub(crate) fn unit(x: &Tensor) -> Result<Tensor> {
    Ok(l2_normalize(&x.to_kind(Kind::Float))?)
}

/// Mean cos(image i, caption own[i]).
fn own_cosine(image_embeds: &Tensor, caption_embeds: &Tensor, own: &Tensor) -> Result<f64> {
    let own = own.to_device(caption_embeds.device());
    let z_t = unit(&caption_embeds.index_select(0, &own))?;
    let cos = (unit(image_embeds)? * z_t).sum_dim_intlist(-1, false, Kind::Float);
    Ok(cos.mean(Kind::Double).double_value(&[]))
}

/// The real images scored as the generated ones are: the ceiling of each figure.
#[derive(Debug, Clone, Serialize)]
pub struct RealScores {
    /// Mean cos(CLIP(image), z_t of its caption).
    pub clip_score: f64,
    /// CLIP's top-1 retrieval of the image's caption among the distinct held-out captions.
    pub clip_top1: f64,
    pub shapes: Option<ShapeTally>,
}

/// The scores of the real held-out images.
pub fn real_scores(held: &HeldOutImages, encoder: &CaptionEncoder) -> Result<RealScores> {
    let (distinct, own) = held.distinct_captions();
    let z_t = caption_embeds(encoder, &distinct)?;
    let own = Tensor::from_slice(&own);
    Ok(RealScores {
        clip_score: own_cosine(&held.image_embeds, &z_t, &own)?,
        clip_top1: caption_top1(&held.image_embeds, &z_t, &own)?,
        shapes: held.real_shapes,
    })
}

/// The text condition of `captions` (at least one), encoded 256 at a time.
pub fn encode_captions(encoder: &CaptionEncoder, captions: &[String]) -> Result<TextCondition> {
    let _g = tch::no_grad_guard();
    let mut parts = captions.chunks(256).map(|c| encoder.encode(c));
    let mut text = parts.next().context("no captions to encode")??;
    for p in parts {
        text = text.cat(&p?)?;
    }
    Ok(text)
}

/// z_t of `captions`.
fn caption_embeds(encoder: &CaptionEncoder, captions: &[String]) -> Result<Tensor> {
    Ok(encode_captions(encoder, captions)?
        .text_embeds
        .to_kind(Kind::Float))
}

/// What the decoder decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Conditioning {
    /// The prior's samples for the caption.
    Prior,
    /// The caption's z_t (the zero-shot baseline).
    TextEmbedding,
    /// The real image's z_i: the decoder's ceiling.
    TrueImageEmbedding,
}

/// One setting of the pipeline scored over the held-out captions.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    pub conditioning: Conditioning,
    /// None without a prior.
    pub prior_guidance: Option<f64>,
    pub decoder_guidance: f64,
    /// Mean cos(CLIP(image), z_t of its caption).
    pub clip_score: f64,
    /// CLIP's top-1 retrieval of the image's caption among the distinct held-out captions.
    pub clip_top1: f64,
    /// Mean cos(CLIP(image), the z_i it was decoded from).
    pub clip_image_score: f64,
    /// Fréchet distance between the CLIP image embeddings of the images and of the real ones.
    pub fd_clip: f64,
    /// Precision, recall, density and coverage of the images' CLIP image embeddings against the
    /// real ones' ([`NEAREST_K`] neighbours); None with too few of either.
    pub manifold: Option<Manifold>,
    /// On shapes scenes: the images' shapes counted against their captions' scenes.
    pub shapes: Option<ShapeTally>,
}

/// `o.count` images for each held-out caption at `o`'s guidance scales, `captions_at_once`
/// captions per [`Pipeline::generate_from`] call (chunk k seeded `o.seed + k`), scored. With
/// `true_image_embeddings` the decoder is given the real images' z_i instead of the prior's
/// samples or z_t. With `save`, image k of sample i is written to `save/NNN_KK.png`.
pub fn score_pipeline(
    pipeline: &Pipeline,
    held: &HeldOutImages,
    o: &PipelineOptions,
    true_image_embeddings: bool,
    captions_at_once: usize,
    save: Option<&Path>,
) -> Result<ImageRow> {
    let conditioning = match (true_image_embeddings, &pipeline.prior) {
        (true, _) => Conditioning::TrueImageEmbedding,
        (false, Some(_)) => Conditioning::Prior,
        (false, None) => Conditioning::TextEmbedding,
    };
    let (distinct, own) = held.distinct_captions();
    let z_t = caption_embeds(&pipeline.encoder, &distinct)?;
    let k = o.count as i64;
    let mut z_x = Vec::new();
    let mut clip_image = Vec::new();
    let mut shapes = held.scenes.as_ref().map(|_| ShapeTally::default());
    let chunk = captions_at_once.max(1);
    for (c, captions) in held.captions.chunks(chunk).enumerate() {
        let first = c * chunk;
        let chunk_options = PipelineOptions {
            seed: o.seed.wrapping_add(c as i64),
            ..o.clone()
        };
        let given = true_image_embeddings.then(|| {
            held.image_embeds
                .narrow(0, first as i64, captions.len() as i64)
        });
        let g = pipeline.generate_from(captions, given.as_ref(), &chunk_options)?;
        if let (Some(tally), Some(scenes)) = (&mut shapes, &held.scenes) {
            let repeated: Vec<Scene> = scenes[first..first + captions.len()]
                .iter()
                .flat_map(|s| std::iter::repeat_n(s.clone(), o.count))
                .collect();
            tally.merge(&unclip_decoder::task::count_shapes(&g.images, &repeated)?);
        }
        if let Some(dir) = save {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for i in 0..captions.len() {
                for draw in 0..o.count {
                    let img = g
                        .images
                        .get(i as i64 * k + draw as i64)
                        .to_device(Device::Cpu);
                    let img = ((img + 1.0) * 0.5).clamp(0.0, 1.0);
                    unclip_train::logging::write_png(&image_path(dir, first + i, draw), &img)?;
                }
            }
        }
        z_x.push(g.image_clip_embeds.to_device(Device::Cpu));
        clip_image.push(g.clip_image.to_device(Device::Cpu));
    }
    let z_x = Tensor::f_cat(&z_x, 0)?;
    let own = Tensor::from_slice(&own).repeat_interleave_self_int(k, 0, None);
    let z_t = z_t.to_device(Device::Cpu);
    // Between normalised embeddings, whichever scale the decoder takes.
    let real = unit(&held.image_embeds)?;
    Ok(ImageRow {
        conditioning,
        prior_guidance: (conditioning == Conditioning::Prior).then_some(o.prior_guidance),
        decoder_guidance: o.decoder_guidance,
        clip_score: own_cosine(&z_x, &z_t, &own)?,
        clip_top1: caption_top1(&z_x, &z_t, &own)?,
        clip_image_score: Tensor::f_cat(&clip_image, 0)?
            .mean(Kind::Double)
            .double_value(&[]),
        fd_clip: frechet_distance(&z_x, &real)?,
        manifold: precision_recall(&real, &unit(&z_x)?, NEAREST_K)?,
        shapes,
    })
}
