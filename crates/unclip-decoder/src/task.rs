//! `train-decoder`: the CLIP-conditioned decoder trained on image shards with their CLIP
//! embeddings (stored by `embed`, or computed on the fly by the frozen CLIP), hybrid loss with
//! learned variances, independent guidance dropout of z_i and the caption, and sample grids of
//! held-out images from their image embeddings, scored by CLIP and, on shapes scenes, by the
//! model-free shape count.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};
use unclip_clip::caption::{image_embeddings, stored_condition, CaptionEncoder, TextCondition};
use unclip_data::embeddings::ClipEmbeddings;
use unclip_data::images::{Crop, ImageTransform, Normalize};
use unclip_data::loader::{DataPosition, ImageBatch, ImageLoader, LoaderConfig, Restartable};
use unclip_data::reader::ReaderConfig;
use unclip_data::shape_score::{score_scene, ShapeTally};
use unclip_data::shapes::Scene;
use unclip_diffusion::embedding::mean_cosine;
use unclip_diffusion::gaussian::loss_per_quarter;
use unclip_diffusion::{
    training_estimate, ClipDenoised, DiffusionConfig, GaussianDiffusion, LossType, MeanType,
    Respacing, SamplerConfig, SamplerName, VarianceType,
};
use unclip_train::config::{check_init_from, Validate};
use unclip_train::{StepOutput, TrainTask};

use crate::config::DecoderModelConfig;
use crate::model::{DecoderCondition, UnclipDecoder};
use crate::sample::DecoderSampler;

/// The `decoder:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderSection {
    pub model: DecoderModelConfig,
    /// Which CLIP embedding the decoder is conditioned on (projected into the timestep embedding
    /// and the extra context tokens): `image` (unCLIP's z_i; a prior supplies it at sampling) or
    /// `text` (z_t in its place: the paper's text-embedding decoder baseline, sampled without a
    /// prior).
    #[serde(default)]
    pub embedding: ConditioningEmbedding,
    /// Start from a diffusers UnCLIP pipeline directory's decoder (`decoder/` + `text_proj/`, e.g.
    /// Karlo's) instead of a random initialisation; `model` must describe the same network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Cosine schedule, 1000 steps, ε with learned-range variances, hybrid loss (λ = 0.001).
    #[serde(default = "default_diffusion")]
    pub diffusion: DiffusionConfig,
    /// How grids and the pipeline sample (default: DDPM, 250 steps, x0 clipped to [-1, 1]).
    #[serde(default = "default_sampling")]
    pub sampling: SamplerConfig,
    #[serde(default = "default_guidance_scale")]
    pub guidance_scale: f64,
    /// Probability that a training sample's z_i is replaced by the learned null embedding.
    #[serde(default = "default_image_drop")]
    pub image_drop_prob: f64,
    /// Probability that a training sample's caption is replaced by the empty caption.
    #[serde(default = "default_text_drop")]
    pub text_drop_prob: f64,
    /// The z_i and z_t it is conditioned on: `normalized` (L2, DALLE2-pytorch's) or `raw` (as the
    /// CLIP's projections give them: diffusers' UnCLIP pipeline and Karlo's decoder). Stored
    /// embeddings must follow it (`embed --raw` writes raw ones); a prior in front of it must
    /// sample the same.
    #[serde(default)]
    pub clip_embeddings: ClipEmbeddings,
    /// Keep only each UNet block's inputs in training and recompute its activations in backward
    /// ([`crate::UNet::set_gradient_checkpointing`]): less memory for about a third more compute.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

pub fn default_diffusion() -> DiffusionConfig {
    DiffusionConfig {
        predict: MeanType::Epsilon,
        variance: VarianceType::LearnedRange,
        loss: LossType::Hybrid,
        ..DiffusionConfig::default()
    }
}

/// The paper's: ancestral sampling with the learned variances over 250 respaced steps (diffusers'
/// UnCLIP pipeline uses 25; DDIM ignores the learned variances).
pub fn default_sampling() -> SamplerConfig {
    SamplerConfig {
        sampler: SamplerName::Ddpm,
        steps: Respacing::Spec("250".into()),
        eta: None,
        clip: ClipDenoised::Static(1.0),
    }
}

fn default_guidance_scale() -> f64 {
    3.0
}
fn default_image_drop() -> f64 {
    0.1
}
fn default_text_drop() -> f64 {
    0.5
}

/// `decoder.embedding`: what fills the decoder's CLIP-embedding input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditioningEmbedding {
    /// The image's CLIP embedding z_i (unCLIP).
    #[default]
    Image,
    /// The caption's CLIP embedding z_t (SPEC.md: "a decoder trained on text embeddings is
    /// another baseline"; MS-COCO FID 9.1 against unCLIP's 7.99).
    Text,
}

/// Where the CLIP conditioning comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingSource {
    /// The embedding shards `embed --token-features` wrote into `data.embedding_dir` (same
    /// shard names and keys as the image shards): no CLIP runs while training.
    #[default]
    Stored,
    /// The frozen CLIP encodes each batch's images and captions.
    Clip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderDataConfig {
    /// Image shards (brace-expanded).
    pub train: String,
    /// Held-out image shards: the sample grids decode their image embeddings.
    pub held_out: String,
    #[serde(default)]
    pub embeddings: EmbeddingSource,
    /// With `embeddings: stored`: the directory of embedding shards.
    #[serde(default)]
    pub embedding_dir: Option<PathBuf>,
    /// The decoder's input: resolution (64 in the paper), crop, flip. Pixels are in [-1, 1].
    #[serde(default = "default_image")]
    pub image: ImageTransform,
    #[serde(default = "yes")]
    pub shard_shuffle: bool,
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Reader threads per rank.
    #[serde(default = "one")]
    pub workers: usize,
}

fn default_image() -> ImageTransform {
    ImageTransform {
        resolution: 64,
        crop: Crop::Center,
        // Stored embeddings were computed on the unflipped image.
        random_flip: false,
        ..ImageTransform::default()
    }
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_shuffle_buffer() -> usize {
    1000
}
fn default_prefetch() -> usize {
    4
}

/// The `samples:` section: what the grids every `logging.images_every` steps show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleGridConfig {
    /// Held-out images (the first ones, in file order): one column each.
    pub count: usize,
    /// One row of samples per guidance scale, under a row of the real images.
    pub guidance_scales: Vec<f64>,
    /// Seed of the sampling noise, the same for every grid.
    pub seed: i64,
    /// SDEdit strengths in (0, 1]: the held-out images noised to the step each starts from and
    /// denoised (one row per strength and guidance scale). How well the decoder finishes a
    /// half-made image, outlines included, which it learns well before it draws them from noise.
    pub denoise_strengths: Vec<f64>,
}

impl Default for SampleGridConfig {
    fn default() -> Self {
        Self {
            count: 8,
            guidance_scales: vec![1.0, 3.0],
            seed: 0,
            denoise_strengths: Vec::new(),
        }
    }
}

/// The task's sections of a `train-decoder` config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderTrainConfig {
    pub decoder: DecoderSection,
    /// The frozen CLIP: a `train-clip` run directory or a Hugging Face CLIP directory.
    pub clip: PathBuf,
    pub data: DecoderDataConfig,
    #[serde(default)]
    pub samples: SampleGridConfig,
}

impl Validate for DecoderTrainConfig {
    fn validate(&self) -> Result<()> {
        let d = &self.decoder;
        d.model.validate()?;
        if let Some(dir) = &d.init_from {
            check_init_from(
                "decoder",
                dir,
                crate::pretrained::read_diffusers_decoder_config,
                &d.model,
            )?;
        }
        d.diffusion
            .validate()
            .map_err(|e| anyhow!("decoder.diffusion: {e}"))?;
        let want = if d.diffusion.variance == VarianceType::LearnedRange {
            6
        } else {
            3
        };
        ensure!(
            d.model.unet.out_channels == want,
            "decoder.model.unet.out_channels must be {want} for diffusion.variance {:?}",
            d.diffusion.variance
        );
        d.sampling
            .validate()
            .map_err(|e| anyhow!("decoder.sampling: {e}"))?;
        d.sampling
            .steps
            .timesteps(d.diffusion.timesteps)
            .map_err(|e| anyhow!("decoder.sampling.steps: {e}"))?;
        ensure!(
            d.guidance_scale.is_finite() && d.guidance_scale >= 0.0,
            "decoder.guidance_scale must be finite and >= 0, got {}",
            d.guidance_scale
        );
        for (key, p) in [
            ("decoder.image_drop_prob", d.image_drop_prob),
            ("decoder.text_drop_prob", d.text_drop_prob),
        ] {
            ensure!((0.0..1.0).contains(&p), "{key} must be in [0, 1), got {p}");
        }
        for (key, s) in [
            ("data.train", &self.data.train),
            ("data.held_out", &self.data.held_out),
        ] {
            ensure!(!s.trim().is_empty(), "{key} must name image shards");
        }
        ensure!(
            self.data.embeddings != EmbeddingSource::Stored || self.data.embedding_dir.is_some(),
            "data.embedding_dir is required with data.embeddings: stored (or set data.embeddings: clip)"
        );
        self.data
            .image
            .validate()
            .map_err(|e| anyhow!("data.image: {e}"))?;
        ensure!(
            self.data.image.normalize == Normalize::MinusOneOne,
            "data.image.normalize must be minus_one_one: the decoder generates pixels in [-1, 1]"
        );
        let levels = d.model.unet.block_out_channels.len() as u32 - 1;
        ensure!(
            self.data.image.resolution.is_multiple_of(1 << levels),
            "data.image.resolution ({}) must be a multiple of {} for {} UNet levels",
            self.data.image.resolution,
            1 << levels,
            levels + 1
        );
        ensure!(self.samples.count >= 1, "samples.count must be at least 1");
        ensure!(
            !self.samples.guidance_scales.is_empty()
                && self
                    .samples
                    .guidance_scales
                    .iter()
                    .all(|s| s.is_finite() && *s >= 0.0),
            "samples.guidance_scales must be a non-empty list of finite scales >= 0"
        );
        let process = GaussianDiffusion::respaced(&d.diffusion, &d.sampling.steps)
            .map_err(|e| anyhow!("decoder.sampling.steps: {e}"))?;
        for &strength in &self.samples.denoise_strengths {
            process
                .strength_start(strength)
                .map_err(|e| anyhow!("samples.denoise_strengths: {e} (decoder.sampling.steps)"))?;
        }
        Ok(())
    }
}

/// Checks that the CLIP fits the decoder's conditioning widths; errors name the keys.
pub fn check_clip_fits(
    encoder: &CaptionEncoder,
    model: &DecoderModelConfig,
    clip: &str,
) -> Result<()> {
    ensure!(
        encoder.embed_dim() == model.clip_embeddings_dim,
        "decoder.model.clip_embeddings_dim ({}) must equal the CLIP embedding width of {clip} ({})",
        model.clip_embeddings_dim,
        encoder.embed_dim()
    );
    ensure!(
        encoder.text_width() == model.clip_embeddings_dim,
        "the CLIP text width of {clip} ({}) must equal decoder.model.clip_embeddings_dim ({}): \
         diffusers' UnCLIPTextProjModel projects token features from clip_embeddings_dim",
        encoder.text_width(),
        model.clip_embeddings_dim
    );
    Ok(())
}

pub struct DecoderBatch {
    /// [B, 3, H, W] in [-1, 1].
    pub images: Tensor,
    pub cond: DecoderCondition,
    position: DataPosition,
}

/// Held-out images with their conditioning, for the grids.
pub struct HeldOut {
    pub images: Tensor,
    /// [N, D]: the images' z_i, what the samples' CLIP score compares with (also with
    /// `decoder.embedding: text`, whose `cond` holds z_t instead).
    pub image_embeds: Tensor,
    pub cond: DecoderCondition,
    /// Each image's scene when the held-out shards are shapes scenes (every sample's `.json`
    /// reads as one): the grids' shapes are then counted.
    pub scenes: Option<Vec<Scene>>,
    /// The real images' shape count (the scorer's ceiling), made once with `scenes`.
    pub real_shapes: Option<ShapeTally>,
}

/// How many of the held-out scenes' objects were drawn in the right shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeReport {
    /// The real images: the scorer's own ceiling (small objects are a few pixels wide).
    pub real: ShapeTally,
    /// Per guidance scale.
    pub samples: Vec<(f64, ShapeTally)>,
    /// Per denoising strength and guidance scale.
    pub denoised: Vec<DenoisedShapes>,
}

/// The held-out images noised to `timestep` (SDEdit `strength`) and denoised at `guidance`: the
/// shapes kept with each scene's own conditioning and, as the control, with another scene's
/// (what the noised image alone keeps); the difference is what the conditioning adds.
#[derive(Debug, Clone, PartialEq)]
pub struct DenoisedShapes {
    pub strength: f64,
    pub timestep: i64,
    pub guidance: f64,
    pub own: ShapeTally,
    pub other: ShapeTally,
}

/// [N, 3, H, W] images in [-1, 1] as 8-bit RGB, the bytes the grid PNGs get.
fn rgb_images(x: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (n, _, h, w) = x.size4()?;
    (0..n)
        .map(|i| {
            let bytes = unclip_train::logging::rgb_bytes(&((x.get(i) + 1.0) * 0.5))?;
            image::RgbImage::from_raw(w as u32, h as u32, bytes)
                .ok_or_else(|| anyhow!("image of {w}×{h} pixels"))
        })
        .collect()
}

/// The shapes of `images` ([N, 3, H, W] in [-1, 1]) counted against their scenes.
pub fn count_shapes(images: &Tensor, scenes: &[Scene]) -> Result<ShapeTally> {
    let mut tally = ShapeTally::default();
    for (img, scene) in rgb_images(images)?.iter().zip(scenes) {
        tally.add(&score_scene(img, scene));
    }
    Ok(tally)
}

/// What one round of held-out sampling produced.
pub struct SampleReport {
    /// [3, rows·H, count·W] in [0, 1]: the real images, one row per guidance scale, then one
    /// per denoising strength and guidance scale.
    pub grid: Tensor,
    /// Per guidance scale: mean cosine(CLIP image embedding of the sample, the held-out image's
    /// z_i, which it was decoded from unless `decoder.embedding: text`).
    pub cos_to_condition: Vec<(f64, f64)>,
    /// Mean cosine(z_i of a held-out image, z_i of another): what an unrelated image scores.
    pub cos_unrelated: f64,
    /// On shapes scenes: the shapes counted. The CLIP score hardly sees shapes (a scene with
    /// every object redrawn in another shape scores ~0.95), so this is what tells them.
    pub shapes: Option<ShapeReport>,
}

impl SampleReport {
    pub fn summary(&self) -> String {
        let rows: Vec<String> = self
            .cos_to_condition
            .iter()
            .map(|(g, c)| format!("guidance {g} {c:.4}"))
            .collect();
        let mut line = format!(
            "cos(CLIP(sample), z_i): {} (unrelated images {:.4})",
            rows.join(", "),
            self.cos_unrelated
        );
        if let Some(s) = &self.shapes {
            let rows: Vec<String> = s
                .samples
                .iter()
                .map(|(g, t)| format!("guidance {g} {t}"))
                .collect();
            line += &format!("\nshapes: {} (real images {})", rows.join(", "), s.real);
            for d in &s.denoised {
                line += &format!(
                    "\nshapes denoised from t={} (strength {}), guidance {}: own conditioning {}; another scene's {}",
                    d.timestep, d.strength, d.guidance, d.own, d.other
                );
            }
        }
        line
    }

    /// TensorBoard scalars: the CLIP score and, on shapes scenes, the fraction of shapes right
    /// and of objects missing, per guidance scale.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .cos_to_condition
            .iter()
            .map(|(g, c)| (format!("samples/clip_score_guidance_{g}"), *c))
            .collect();
        if let Some(s) = &self.shapes {
            for (g, t) in &s.samples {
                out.push((
                    format!("samples/shapes_right_guidance_{g}"),
                    t.fraction_right(),
                ));
                out.push((
                    format!("samples/objects_missing_guidance_{g}"),
                    t.missing as f64 / t.objects.max(1) as f64,
                ));
            }
            for d in &s.denoised {
                let key = format!("denoised_{}_guidance_{}", d.strength, d.guidance);
                out.push((
                    format!("samples/shapes_right_{key}"),
                    d.own.fraction_right(),
                ));
                out.push((
                    format!("samples/shapes_right_{key}_other_conditioning"),
                    d.other.fraction_right(),
                ));
            }
        }
        out
    }
}

pub struct DecoderTask {
    pub model: UnclipDecoder,
    pub encoder: CaptionEncoder,
    null: TextCondition,
    diffusion: GaussianDiffusion,
    loader: ImageLoader,
    loader_cfg: LoaderConfig,
    held_out: Option<HeldOut>,
    cfg: DecoderTrainConfig,
    device: Device,
    /// Where grids are written as PNG files (`<run_dir>/samples`), on rank 0.
    samples_dir: Option<PathBuf>,
    position: DataPosition,
    skipped_total: u64,
    /// Scalars of the last `images` call's samples.
    sample_scalars: Vec<(String, f64)>,
}

fn loader_config(
    cfg: &DecoderTrainConfig,
    reader: ReaderConfig,
    batch_size: usize,
) -> LoaderConfig {
    LoaderConfig {
        reader,
        transform: cfg.data.image.clone(),
        batch_size,
        prefetch: cfg.data.prefetch,
        start: DataPosition::default(),
        embeddings: match cfg.data.embeddings {
            EmbeddingSource::Stored => cfg.data.embedding_dir.clone(),
            EmbeddingSource::Clip => None,
        },
        workers: cfg.data.workers,
    }
}

/// [N, 3, H, W] images per row (in [-1, 1]) tiled into one [3, rows·H, N·W] image in [0, 1].
pub fn tile_rows(rows: &[Tensor]) -> Result<Tensor> {
    let strips: Vec<Tensor> = rows
        .iter()
        .map(|r| {
            let r = (r.to_kind(Kind::Float).to_device(Device::Cpu) + 1.0) * 0.5;
            // [N, 3, H, W] → [3, H, N·W]
            let (n, c, h, w) = r.size4()?;
            Ok(r.permute([1, 2, 0, 3]).reshape([c, h, n * w]))
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::f_cat(&strips, 1)?.clamp(0.0, 1.0))
}

impl DecoderTask {
    /// Loads the frozen CLIP, builds the decoder at the root of `vs` (diffusers' pipeline names
    /// `text_proj.*`, `decoder.*`) and starts the data stream for `rank`. Grids go to
    /// `run_dir/samples` when given.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vs: &nn::VarStore,
        cfg: &DecoderTrainConfig,
        seed: u64,
        batch_size: usize,
        rank: usize,
        world_size: usize,
        run_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let device = vs.device();
        let clip_name = cfg.clip.display().to_string();
        let encoder = CaptionEncoder::load_with(&cfg.clip, device, cfg.decoder.clip_embeddings)
            .with_context(|| format!("clip: {clip_name}"))?;
        check_clip_fits(&encoder, &cfg.decoder.model, &clip_name)?;
        let mut model = UnclipDecoder::from_config(vs.root(), &cfg.decoder.model)?;
        model
            .unet
            .set_gradient_checkpointing(cfg.decoder.gradient_checkpointing);
        if let Some(dir) = &cfg.decoder.init_from {
            crate::pretrained::load_diffusers_decoder_weights(vs, dir)
                .with_context(|| format!("decoder.init_from {}", dir.display()))?;
        }
        let loader_cfg = loader_config(
            cfg,
            ReaderConfig {
                shards: cfg.data.train.clone(),
                rank,
                world_size,
                seed,
                shard_shuffle: cfg.data.shard_shuffle,
                shuffle_buffer: cfg.data.shuffle_buffer,
            },
            batch_size,
        );
        let loader = ImageLoader::start(loader_cfg.clone())
            .with_context(|| format!("data.train {}", cfg.data.train))?;
        let null = encoder.null_condition()?;
        let mut task = Self {
            model,
            null,
            diffusion: GaussianDiffusion::new(&cfg.decoder.diffusion)?.to_device(device),
            loader,
            loader_cfg,
            held_out: None,
            cfg: cfg.clone(),
            device,
            samples_dir: run_dir.filter(|_| rank == 0).map(|d| d.join("samples")),
            position: DataPosition::default(),
            skipped_total: 0,
            sample_scalars: Vec::new(),
            encoder,
        };
        // Missing token features or mismatched embedding widths fail here (naming the sample),
        // not at the first step.
        if rank == 0 {
            let mut held = ImageLoader::start(LoaderConfig {
                prefetch: 1,
                ..loader_config(
                    cfg,
                    ReaderConfig::in_order(cfg.data.held_out.clone()),
                    cfg.samples.count,
                )
            })
            .with_context(|| format!("data.held_out {}", cfg.data.held_out))?;
            let b = held.next_batch()?;
            let batch = task
                .to_batch(&b)
                .with_context(|| format!("data.held_out {}", cfg.data.held_out))?;
            let scenes: Option<Vec<Scene>> = b
                .metadata
                .iter()
                .map(|m| {
                    m.clone()
                        .and_then(|v| serde_json::from_value::<Scene>(v).ok())
                })
                .collect();
            let real_shapes = match &scenes {
                Some(scenes) => Some(count_shapes(&batch.images, scenes)?),
                None => None,
            };
            let image_embeds = match cfg.decoder.embedding {
                ConditioningEmbedding::Image => batch.cond.image_embeds.shallow_clone(),
                ConditioningEmbedding::Text => task.image_embeds(&b, &batch.images)?,
            };
            task.held_out = Some(HeldOut {
                images: batch.images,
                image_embeds,
                cond: batch.cond,
                scenes,
                real_shapes,
            });
        }
        Ok(task)
    }

    pub fn null_text(&self) -> &TextCondition {
        &self.null
    }

    pub fn held_out(&self) -> Option<&HeldOut> {
        self.held_out.as_ref()
    }

    /// The CLIP conditioning of a loader batch, from the embedding shards or the frozen CLIP:
    /// the caption's, and z_i or z_t in the embedding slot as `decoder.embedding` says.
    pub fn condition(&self, b: &ImageBatch, images: &Tensor) -> Result<DecoderCondition> {
        if self.cfg.data.embeddings == EmbeddingSource::Stored {
            self.cfg
                .decoder
                .clip_embeddings
                .check(&b.embeddings, "decoder.clip_embeddings")
                .map_err(|e| {
                    let dir = self
                        .cfg
                        .data
                        .embedding_dir
                        .as_deref()
                        .unwrap_or(Path::new(""));
                    anyhow!("data.embedding_dir {}: {e}", dir.display())
                })?;
        }
        let text = match self.cfg.data.embeddings {
            EmbeddingSource::Stored => stored_condition(
                &b.embeddings,
                self.encoder.context_length(),
                self.encoder.text_width(),
                self.device,
            )?,
            EmbeddingSource::Clip => self.encoder.encode(&b.captions)?,
        };
        let image_embeds = match self.cfg.decoder.embedding {
            ConditioningEmbedding::Image => self.image_embeds(b, images)?,
            ConditioningEmbedding::Text => text.text_embeds.shallow_clone(),
        };
        Ok(DecoderCondition { image_embeds, text })
    }

    /// The CLIP image embeddings z_i of a loader batch's images, stored or computed.
    fn image_embeds(&self, b: &ImageBatch, images: &Tensor) -> Result<Tensor> {
        match self.cfg.data.embeddings {
            EmbeddingSource::Stored => {
                let d = self.cfg.decoder.model.clip_embeddings_dim;
                let image_embeds = image_embeddings(&b.embeddings, self.device);
                ensure!(
                    image_embeds.size() == [b.len() as i64, d],
                    "embedding shards hold embeddings of shape {:?}, decoder.model.clip_embeddings_dim is {d}",
                    image_embeds.size()
                );
                Ok(image_embeds)
            }
            EmbeddingSource::Clip => self.encoder.clip.embed_images(images),
        }
    }

    fn to_batch(&self, b: &ImageBatch) -> Result<DecoderBatch> {
        let r = i64::from(b.resolution);
        let images = Tensor::from_slice(&b.images)
            .view([b.len() as i64, 3, r, r])
            .to_device(self.device);
        Ok(DecoderBatch {
            cond: self.condition(b, &images)?,
            images,
            position: b.position,
        })
    }

    /// Decodes the held-out images' conditioning (z_i, or z_t with `decoder.embedding: text`,
    /// and their captions) at each of `samples`' guidance scales from the same seeded noise, and
    /// scores each sample by how close CLIP puts it to its real image's z_i. None on ranks
    /// without the held-out set.
    pub fn sample_held_out(&self) -> Result<Option<SampleReport>> {
        let Some(h) = &self.held_out else {
            return Ok(None);
        };
        let _g = tch::no_grad_guard();
        let d = &self.cfg.decoder;
        let sampler = DecoderSampler::new(&self.model, &d.diffusion, &d.sampling)?;
        let z = &h.image_embeds;
        let mut rows = vec![h.images.shallow_clone()];
        let mut cos = Vec::new();
        let mut shapes = h.real_shapes.map(|real| ShapeReport {
            real,
            samples: Vec::new(),
            denoised: Vec::new(),
        });
        for &g in &self.cfg.samples.guidance_scales {
            tch::manual_seed(self.cfg.samples.seed);
            let noise = h.images.randn_like();
            let x = sampler.sample(&h.cond, &self.null, g, noise)?;
            let z_x = self.encoder.clip.embed_images(&x)?;
            cos.push((g, mean_cosine(&z_x, z)?));
            if let (Some(report), Some(scenes)) = (&mut shapes, &h.scenes) {
                report.samples.push((g, count_shapes(&x, scenes)?));
            }
            rows.push(x);
        }
        // The control: scene i denoised with scene i + 1's conditioning.
        let n = h.cond.len();
        let next = (Tensor::arange(n, (Kind::Int64, h.images.device())) + 1).remainder(n);
        let other_cond = h.cond.index_select(&next)?;
        for &strength in &self.cfg.samples.denoise_strengths {
            let timestep = sampler.strength_timestep(strength)?;
            for &guidance in &self.cfg.samples.guidance_scales {
                let denoise = |cond: &DecoderCondition| {
                    tch::manual_seed(self.cfg.samples.seed);
                    let noise = h.images.randn_like();
                    sampler.denoise(cond, &self.null, guidance, &h.images, strength, &noise)
                };
                let x = denoise(&h.cond)?;
                if let (Some(report), Some(scenes)) = (&mut shapes, &h.scenes) {
                    report.denoised.push(DenoisedShapes {
                        strength,
                        timestep,
                        guidance,
                        own: count_shapes(&x, scenes)?,
                        other: count_shapes(&denoise(&other_cond)?, scenes)?,
                    });
                }
                rows.push(x);
            }
        }
        let cos_unrelated = if z.size()[0] > 1 {
            mean_cosine(z, &z.roll([1], [0]))?
        } else {
            f64::NAN
        };
        Ok(Some(SampleReport {
            grid: tile_rows(&rows)?,
            cos_to_condition: cos,
            cos_unrelated,
            shapes,
        }))
    }
}

impl TrainTask for DecoderTask {
    type Batch = DecoderBatch;

    fn next_batch(&mut self, _step: u64, _micro: usize) -> Result<DecoderBatch> {
        let b = self.loader.next_batch()?;
        self.skipped_total = b.skipped_total;
        for r in &b.finished_epochs {
            eprintln!("{}", r.message(self.loader_cfg.reader.rank));
        }
        self.to_batch(&b)
    }

    fn loss(&mut self, batch: &DecoderBatch) -> Result<StepOutput> {
        let x0 = &batch.images;
        let b = x0.size()[0];
        let t = self.diffusion.sample_timesteps(b, self.device);
        let noise = x0.randn_like();
        let x_t = self.diffusion.q_sample(x0, &t, &noise)?;
        // Classifier-free guidance: z_i and the caption are dropped independently.
        let d = &self.cfg.decoder;
        let drop_image = Tensor::rand([b], (Kind::Float, self.device)).lt(d.image_drop_prob);
        let drop_text = Tensor::rand([b], (Kind::Float, self.device)).lt(d.text_drop_prob);
        let cond =
            self.model
                .drop_conditioning(&batch.cond, &drop_image, &drop_text, &self.null)?;
        let input = if self.model.self_condition {
            let m = &self.model;
            let estimate = training_estimate(
                &self.diffusion,
                &x_t,
                &t,
                &d.sampling.clip,
                |x: &Tensor, x0: &Tensor, t: &Tensor| m.forward_t(&m.input(x, x0)?, t, &cond, true),
            )?;
            self.model.input(&x_t, &estimate)?
        } else {
            x_t.shallow_clone()
        };
        let out = self.model.forward_t(&input, &t, &cond, true)?;
        let losses = self.diffusion.training_losses(&out, x0, &x_t, &t, &noise)?;
        self.position = batch.position;
        let mut metrics = loss_per_quarter(&losses.loss, &t, self.diffusion.num_timesteps())?;
        metrics.push(("data_skipped".into(), self.skipped_total as f64));
        Ok(StepOutput {
            loss: losses.loss.mean(Kind::Float),
            samples: b as usize,
            metrics,
        })
    }

    fn images(&mut self, step: u64) -> Result<Vec<(String, Tensor)>> {
        let Some(report) = self.sample_held_out()? else {
            return Ok(Vec::new());
        };
        eprintln!("samples step {step}: {}", report.summary());
        self.sample_scalars = report.scalars();
        if let Some(dir) = &self.samples_dir {
            unclip_train::logging::write_png(
                &dir.join(format!("step_{step:06}.png")),
                &report.grid,
            )?;
        }
        Ok(vec![("samples/held_out".into(), report.grid)])
    }

    fn sample_scalars(&mut self) -> Vec<(String, f64)> {
        std::mem::take(&mut self.sample_scalars)
    }

    fn data_state(&self) -> serde_json::Value {
        self.position.to_state()
    }

    fn restore_data_state(&mut self, state: &serde_json::Value) -> Result<()> {
        if let Some((loader, position)) = ImageLoader::resume(&self.loader_cfg, state)? {
            self.loader = loader;
            self.position = position;
        }
        Ok(())
    }
}
