//! `train-prior`: the diffusion or the autoregressive prior trained on the embedding shards
//! `embed` writes, through the shared runtime, with guidance dropout and held-out evaluation of
//! sampled embeddings.

use std::path::PathBuf;

use anyhow::{anyhow, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};
use unclip_data::embedding_loader::{EmbeddingBatch, EmbeddingLoader, EmbeddingLoaderConfig};
use unclip_data::embeddings::{parse_embedding_sample, ClipEmbeddings, EmbeddingSample};
use unclip_data::loader::{DataPosition, Restartable};
use unclip_data::reader::{ReaderConfig, ShardReader};
use unclip_diffusion::gaussian::loss_per_quarter;
use unclip_diffusion::{
    ClipDenoised, DiffusionConfig, GaussianDiffusion, MeanType, Respacing, SamplerConfig,
    SamplerName, VarianceType,
};
use unclip_train::config::{check_init_from, Validate};
use unclip_train::{StepOutput, TrainTask};

use crate::autoregressive::ArPriorConfig;
use crate::config::PriorConfig;
use crate::model::{init_prior_weights, TextCondition};
use crate::prior::Prior;
use unclip_clip::caption::{image_embeddings, stored_condition, text_embeddings, CaptionEncoder};

/// Which prior `train-prior` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriorKind {
    /// `prior.model`: diffusers' `PriorTransformer`, denoising z_i.
    #[default]
    Diffusion,
    /// `prior.autoregressive`: quantised principal components of z_i, predicted in order.
    Autoregressive,
}

/// The `prior:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorSection {
    #[serde(default)]
    pub kind: PriorKind,
    /// The diffusion prior's transformer, in diffusers `PriorTransformer` config names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PriorConfig>,
    /// Start the diffusion prior from a diffusers `PriorTransformer` directory, or a UnCLIP
    /// pipeline directory's `prior/` (e.g. Karlo's), instead of a random initialisation: its
    /// weights and its `clip_mean` / `clip_std` (kept, not refitted). `model` must describe the
    /// same network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// The autoregressive prior: its transformer, codec and sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoregressive: Option<ArPriorConfig>,
    /// The diffusion prior's training process: cosine schedule, 1000 steps, predicting x0, MSE
    /// (the paper's).
    #[serde(default = "default_diffusion")]
    pub diffusion: DiffusionConfig,
    /// How the diffusion prior samples (evaluation, `--sample`, the inference pipeline).
    #[serde(default = "default_sampling")]
    pub sampling: SamplerConfig,
    #[serde(default = "default_guidance_scale")]
    pub guidance_scale: f64,
    /// Draws per caption; the one with the highest z_i · z_t is kept.
    #[serde(default = "default_candidates")]
    pub candidates: usize,
    /// Probability of training a sample with the null caption (z_t and token features of "").
    #[serde(default = "default_text_drop")]
    pub text_drop_prob: f64,
    /// The z_t it reads and the z_i it samples: `normalized` (L2, DALLE2-pytorch's) or `raw` (as
    /// the CLIP's projections give them: diffusers' UnCLIP pipeline and Karlo's prior). The
    /// training embeddings must follow it (`embed --raw` writes raw ones). Diffusion prior only.
    #[serde(default)]
    pub clip_embeddings: ClipEmbeddings,
    /// Keep only each transformer block's input in training and recompute its activations in
    /// backward: less memory for more compute. Diffusion prior only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

impl PriorSection {
    /// `prior.model`, which the diffusion kind needs.
    pub fn diffusion_model(&self) -> Result<&PriorConfig> {
        self.model.as_ref().ok_or_else(|| {
            anyhow!("prior.model is missing: the diffusion prior's transformer (kind: diffusion)")
        })
    }

    /// `prior.autoregressive`, which the autoregressive kind needs.
    pub fn autoregressive_model(&self) -> Result<&ArPriorConfig> {
        self.autoregressive.as_ref().ok_or_else(|| {
            anyhow!("prior.autoregressive is missing: the autoregressive prior's settings (kind: autoregressive)")
        })
    }

    /// The config key of the model's settings, for messages.
    pub fn model_key(&self) -> &'static str {
        match self.kind {
            PriorKind::Diffusion => "prior.model",
            PriorKind::Autoregressive => "prior.autoregressive",
        }
    }

    /// The CLIP embedding width and context length the prior is built for.
    pub fn clip_shape(&self) -> Result<(i64, i64)> {
        Ok(match self.kind {
            PriorKind::Diffusion => {
                let m = self.diffusion_model()?;
                (m.embedding_dim, m.num_embeddings)
            }
            PriorKind::Autoregressive => {
                let m = self.autoregressive_model()?;
                (m.embedding_dim, m.num_embeddings)
            }
        })
    }

    /// Variables of the prior the section builds, without building it.
    pub fn parameter_count(&self) -> Result<i64> {
        Ok(match self.kind {
            PriorKind::Diffusion => self.diffusion_model()?.parameter_count(),
            PriorKind::Autoregressive => self.autoregressive_model()?.parameter_count(),
        })
    }
}

pub fn default_diffusion() -> DiffusionConfig {
    DiffusionConfig {
        predict: MeanType::X0,
        ..DiffusionConfig::default()
    }
}

pub fn default_sampling() -> SamplerConfig {
    SamplerConfig {
        sampler: SamplerName::Ddim,
        steps: Respacing::Spec("64".into()),
        eta: None,
        // diffusers' UnCLIP prior scheduler clips x0 to ±10 in the standardised space.
        clip: ClipDenoised::Static(10.0),
    }
}

fn default_guidance_scale() -> f64 {
    2.0
}
fn default_candidates() -> usize {
    2
}
fn default_text_drop() -> f64 {
    0.1
}

/// Where the prior's caption token features come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextFeatureSource {
    /// `txt_tokens.npy` in the embedding shards (`embed --token-features`): no text encoder runs
    /// while training.
    #[default]
    Stored,
    /// The frozen CLIP text encoder runs on each batch's captions: no per-token storage.
    Clip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorDataConfig {
    /// Embedding shards (`embed`'s output), brace-expanded.
    pub train: String,
    /// Held-out embedding shards for evaluation.
    pub held_out: String,
    #[serde(default)]
    pub text_features: TextFeatureSource,
    #[serde(default = "yes")]
    pub shard_shuffle: bool,
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Training image embeddings (in file order) the standardisation statistics come from.
    #[serde(default = "default_stats_samples")]
    pub stats_samples: usize,
}

fn yes() -> bool {
    true
}
fn default_shuffle_buffer() -> usize {
    1000
}
fn default_prefetch() -> usize {
    4
}
fn default_stats_samples() -> usize {
    10_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorEvalConfig {
    /// Evaluate every this many steps (0: never).
    pub every: u64,
    /// Held-out samples (the first ones, in file order).
    pub count: usize,
    /// The guidance scales swept at each evaluation.
    pub guidance_scales: Vec<f64>,
    /// Seed of the sampling noise, the same at every evaluation.
    pub seed: i64,
}

impl Default for PriorEvalConfig {
    fn default() -> Self {
        Self {
            every: 200,
            count: 256,
            guidance_scales: vec![1.0, 2.0, 4.0],
            seed: 0,
        }
    }
}

/// The task's sections of a `train-prior` config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorTrainConfig {
    pub prior: PriorSection,
    /// The frozen CLIP: a `train-clip` run directory or a Hugging Face CLIP directory.
    pub clip: PathBuf,
    pub data: PriorDataConfig,
    #[serde(default, deserialize_with = "eval_with_defaults")]
    pub eval: PriorEvalConfig,
}

/// `eval:` with any subset of its keys.
fn eval_with_defaults<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PriorEvalConfig, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Partial {
        every: Option<u64>,
        count: Option<usize>,
        guidance_scales: Option<Vec<f64>>,
        seed: Option<i64>,
    }
    let p = Partial::deserialize(d)?;
    let def = PriorEvalConfig::default();
    Ok(PriorEvalConfig {
        every: p.every.unwrap_or(def.every),
        count: p.count.unwrap_or(def.count),
        guidance_scales: p.guidance_scales.unwrap_or(def.guidance_scales),
        seed: p.seed.unwrap_or(def.seed),
    })
}

impl Validate for PriorTrainConfig {
    fn validate(&self) -> Result<()> {
        let p = &self.prior;
        match p.kind {
            PriorKind::Diffusion => {
                let model = p.diffusion_model()?;
                model.validate()?;
                if let Some(dir) = &p.init_from {
                    check_init_from(
                        "prior",
                        dir,
                        |d| crate::load::read_diffusers_prior_config(&crate::load::prior_dir(d)?),
                        model,
                    )?;
                }
                ensure!(
                    p.autoregressive.is_none(),
                    "prior.autoregressive is the autoregressive prior's section; this prior is kind: diffusion"
                );
            }
            PriorKind::Autoregressive => {
                let ar = p.autoregressive_model()?;
                ar.validate()?;
                ensure!(
                    p.clip_embeddings == ClipEmbeddings::Normalized,
                    "prior.clip_embeddings: raw is for the diffusion prior; the autoregressive \
                     prior's codec quantises L2-normalised embeddings and its z_i · z_t band a cosine"
                );
                ensure!(
                    p.init_from.is_none(),
                    "prior.init_from loads a diffusers PriorTransformer: the diffusion prior's (kind: diffusion)"
                );
                ensure!(
                    !p.gradient_checkpointing,
                    "prior.gradient_checkpointing is for the diffusion prior (kind: diffusion)"
                );
                ensure!(
                    p.model.is_none(),
                    "prior.model is the diffusion prior's transformer; this prior is kind: autoregressive (its settings go under prior.autoregressive)"
                );
                ensure!(
                    self.data.stats_samples as i64 > ar.components,
                    "data.stats_samples ({}) must exceed prior.autoregressive.components ({}) to fit the PCA",
                    self.data.stats_samples,
                    ar.components
                );
            }
        }
        p.diffusion
            .validate()
            .map_err(|e| anyhow!("prior.diffusion: {e}"))?;
        ensure!(
            p.diffusion.variance != VarianceType::LearnedRange,
            "prior.diffusion.variance: the prior outputs no variance channels (use fixed_small or fixed_large)"
        );
        p.sampling
            .validate()
            .map_err(|e| anyhow!("prior.sampling: {e}"))?;
        p.sampling
            .steps
            .timesteps(p.diffusion.timesteps)
            .map_err(|e| anyhow!("prior.sampling.steps: {e}"))?;
        ensure!(
            p.guidance_scale.is_finite() && p.guidance_scale >= 0.0,
            "prior.guidance_scale must be finite and >= 0, got {}",
            p.guidance_scale
        );
        ensure!(p.candidates >= 1, "prior.candidates must be at least 1");
        ensure!(
            (0.0..1.0).contains(&p.text_drop_prob),
            "prior.text_drop_prob must be in [0, 1), got {}",
            p.text_drop_prob
        );
        for (key, s) in [
            ("data.train", &self.data.train),
            ("data.held_out", &self.data.held_out),
        ] {
            ensure!(!s.trim().is_empty(), "{key} must name embedding shards");
        }
        ensure!(
            self.data.stats_samples >= 2,
            "data.stats_samples must be at least 2"
        );
        ensure!(self.eval.count >= 1, "eval.count must be at least 1");
        ensure!(
            self.eval
                .guidance_scales
                .iter()
                .all(|s| s.is_finite() && *s >= 0.0),
            "eval.guidance_scales must be finite and >= 0"
        );
        Ok(())
    }
}

/// The first `count` samples of the embedding shards `shards` (brace-expanded) in file order.
pub fn read_in_order(shards: &str, count: usize) -> Result<Vec<EmbeddingSample>> {
    let reader = ShardReader::with_parser(
        &ReaderConfig::in_order(shards.to_string()),
        0,
        parse_embedding_sample,
    )?;
    let samples: Vec<EmbeddingSample> = reader.iter().take(count).collect();
    ensure!(
        !samples.is_empty(),
        "{shards}: no readable embedding samples ({} skipped)",
        reader.skipped()
    );
    Ok(samples)
}

pub struct PriorBatch {
    /// Clean image embeddings [B, D].
    pub image_embeds: Tensor,
    pub text: TextCondition,
    position: DataPosition,
}

/// Held-out text with its true image embeddings.
pub struct HeldOut {
    pub text: TextCondition,
    pub image_embeds: Tensor,
}

/// Held-out figures for one guidance scale.
#[derive(Debug, Clone, Copy)]
pub struct EvalRow {
    pub guidance_scale: f64,
    /// Mean cosine(sampled z_i, true z_i).
    pub cos_true: f64,
    /// Mean cosine(sampled z_i, z_t).
    pub cos_text: f64,
    /// Precision (fidelity) and recall (diversity) of the sampled z_i against the true ones, as
    /// unit vectors; None with too few captions.
    pub manifold: Option<unclip_clip::metrics::Manifold>,
}

#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Mean cosine(z_t, true z_i): what using z_t directly as the image embedding scores.
    pub baseline: f64,
    /// Autoregressive prior: mean cosine(true z_i, z_i through the codec and back) — the most
    /// cos(sample, z_i) can reach.
    pub codec_round_trip: Option<f64>,
    pub rows: Vec<EvalRow>,
}

impl EvalReport {
    /// One line: the baseline, then cos(sample, true z_i) / cos(sample, z_t) per guidance scale
    /// (and the samples' precision / recall against the true z_i).
    pub fn summary(&self) -> String {
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                let manifold = r.manifold.map_or(String::new(), |m| {
                    format!(" (precision {:.3}, recall {:.3})", m.precision, m.recall)
                });
                format!(
                    "guidance {} {:.4}/{:.4}{manifold}",
                    r.guidance_scale, r.cos_true, r.cos_text
                )
            })
            .collect();
        let codec = self
            .codec_round_trip
            .map_or(String::new(), |c| format!(", codec round trip {c:.4}"));
        format!(
            "cos(z_t, z_i) baseline {:.4}{codec}; cos(sample, z_i)/cos(sample, z_t): {}",
            self.baseline,
            rows.join(", ")
        )
    }
}

/// How [`Prior::evaluate`] samples: each guidance scale from the same seeded noise.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub sampling: crate::prior::PriorSampling,
    pub guidance_scales: Vec<f64>,
    pub candidates: usize,
    pub seed: i64,
}

pub struct PriorTask {
    pub model: Prior,
    pub encoder: CaptionEncoder,
    null: TextCondition,
    diffusion: GaussianDiffusion,
    loader: EmbeddingLoader,
    loader_cfg: EmbeddingLoaderConfig,
    held_out: Option<HeldOut>,
    cfg: PriorTrainConfig,
    device: Device,
    step: u64,
    last_eval: Option<u64>,
    position: DataPosition,
    skipped_total: u64,
}

/// Checks that the CLIP fits the prior's shape; errors name the keys.
pub fn check_clip_fits(encoder: &CaptionEncoder, prior: &PriorSection, clip: &str) -> Result<()> {
    let (dim, tokens) = prior.clip_shape()?;
    let key = prior.model_key();
    ensure!(
        encoder.embed_dim() == dim,
        "{key}.embedding_dim ({dim}) must equal the CLIP embedding width of {clip} ({})",
        encoder.embed_dim()
    );
    ensure!(
        encoder.text_width() == dim,
        "the CLIP text width of {clip} ({}) must equal {key}.embedding_dim ({dim}): the prior \
         projects token features from embedding_dim, as diffusers' PriorTransformer",
        encoder.text_width(),
    );
    ensure!(
        encoder.context_length() == tokens,
        "{key}.num_embeddings ({tokens}) must equal the CLIP context length of {clip} ({})",
        encoder.context_length()
    );
    Ok(())
}

/// Whether a diffusion prior's standardisation describes embeddings of another scale than `z_i`
/// [N, D] (RMS norms, E‖z‖² = ‖μ‖² + Σσ², more than 10 % apart): what it says, if so. Karlo's
/// prior, for one, takes CLIP embeddings unnormalised, where `embed` stores unit vectors.
pub fn scale_mismatch(model: &Prior, z_i: &Tensor) -> Option<String> {
    let Prior::Diffusion(m) = model else {
        return None;
    };
    let (mean, std) = m.clip_stats();
    let implied = (mean.square().sum(Kind::Double) + std.square().sum(Kind::Double))
        .sqrt()
        .double_value(&[]);
    let data = z_i
        .to_kind(Kind::Double)
        .square()
        .sum_dim_intlist(-1, false, Kind::Double)
        .mean(Kind::Double)
        .sqrt()
        .double_value(&[]);
    ((implied / data - 1.0).abs() > 0.1).then(|| {
        format!(
            "its clip_mean / clip_std describe image embeddings of RMS norm {implied:.3}, the \
             training embeddings' (data.train) is {data:.3}: the pretrained prior is fed inputs of \
             another scale than it was trained on (Karlo's takes CLIP embeddings unnormalised: \
             embed them with `embed --raw` and set prior.clip_embeddings: raw)"
        )
    })
}

/// Embedding samples from `key` (`shards`) must follow `prior.clip_embeddings`.
fn check_convention(
    prior: &PriorSection,
    samples: &[EmbeddingSample],
    key: &str,
    shards: &str,
) -> Result<()> {
    prior
        .clip_embeddings
        .check(samples, "prior.clip_embeddings")
        .map_err(|e| anyhow!("{key} {shards}: {e}"))
}

impl PriorTask {
    /// Loads the frozen CLIP, builds the prior at the root of `vs` (diffusers' names), sets its
    /// standardisation from the training embeddings and starts the data stream for `rank`.
    pub fn new(
        vs: &nn::VarStore,
        cfg: &PriorTrainConfig,
        seed: u64,
        batch_size: usize,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        let device = vs.device();
        let clip_name = cfg.clip.display().to_string();
        let encoder = CaptionEncoder::load_with(&cfg.clip, device, cfg.prior.clip_embeddings)
            .with_context(|| format!("clip: {clip_name}"))?;
        check_clip_fits(&encoder, &cfg.prior, &clip_name)?;
        let mut model = Prior::new(vs.root(), &cfg.prior)?;
        if let Prior::Diffusion(m) = &mut model {
            m.set_gradient_checkpointing(cfg.prior.gradient_checkpointing);
        }
        init_prior_weights(vs, "");
        // Every rank reads the same first samples, so all agree without communicating.
        let stats = read_in_order(&cfg.data.train, cfg.data.stats_samples)
            .with_context(|| format!("data.train {}", cfg.data.train))?;
        check_convention(&cfg.prior, &stats, "data.train", &cfg.data.train)?;
        let (dim, _) = cfg.prior.clip_shape()?;
        let d = stats[0].image_emb.len() as i64;
        ensure!(
            d == dim,
            "data.train {}: embeddings of width {d}, {}.embedding_dim is {dim}",
            cfg.data.train,
            cfg.prior.model_key()
        );
        match &cfg.prior.init_from {
            // The pretrained transformer works in its own standardised space: keep its stats.
            Some(dir) => {
                crate::load::prior_dir(dir)
                    .and_then(|d| crate::load::load_diffusers_prior_weights(vs, &d))
                    .with_context(|| format!("prior.init_from {}", dir.display()))?;
                // Rank 0 alone prints it, so the others need not compute it.
                if rank == 0 {
                    let z_i = image_embeddings(&stats, device);
                    if let Some(warning) = scale_mismatch(&model, &z_i) {
                        eprintln!("warning: prior.init_from {}: {warning}", dir.display());
                    }
                }
            }
            None => model
                .fit(
                    &image_embeddings(&stats, device),
                    &text_embeddings(&stats, device),
                )
                .with_context(|| format!("data.train {}", cfg.data.train))?,
        }
        if let Prior::Autoregressive(m) = &model {
            if rank == 0 {
                eprintln!(
                    "codec: {} of {dim} principal components hold {:.2} % of the variance of {} training z_i",
                    m.cfg.components,
                    100.0 * m.codec.explained_variance(),
                    stats.len()
                );
            }
        }
        let loader_cfg = EmbeddingLoaderConfig {
            reader: ReaderConfig {
                shards: cfg.data.train.clone(),
                rank,
                world_size,
                seed,
                shard_shuffle: cfg.data.shard_shuffle,
                shuffle_buffer: cfg.data.shuffle_buffer,
            },
            batch_size,
            prefetch: cfg.data.prefetch,
            start: DataPosition::default(),
        };
        let loader = EmbeddingLoader::start(loader_cfg.clone())
            .with_context(|| format!("data.train {}", cfg.data.train))?;
        let null = encoder.null_condition()?;
        let mut task = Self {
            model,
            null,
            diffusion: GaussianDiffusion::new(&cfg.prior.diffusion)?.to_device(device),
            loader,
            loader_cfg,
            held_out: None,
            cfg: cfg.clone(),
            device,
            step: 0,
            last_eval: None,
            position: DataPosition::default(),
            skipped_total: 0,
            encoder,
        };
        // Missing token features fail here, naming the sample, not at the first step.
        task.condition(&stats[..1])
            .with_context(|| format!("data.train {}", cfg.data.train))?;
        if rank == 0 {
            let samples = read_in_order(&cfg.data.held_out, cfg.eval.count)
                .with_context(|| format!("data.held_out {}", cfg.data.held_out))?;
            check_convention(&cfg.prior, &samples, "data.held_out", &cfg.data.held_out)?;
            task.held_out = Some(HeldOut {
                text: task.condition(&samples)?,
                image_embeds: image_embeddings(&samples, device),
            });
        }
        Ok(task)
    }

    /// The text condition of embedding samples, from stored features or the CLIP text encoder.
    pub fn condition(&self, samples: &[EmbeddingSample]) -> Result<TextCondition> {
        match self.cfg.data.text_features {
            TextFeatureSource::Stored => {
                let (dim, tokens) = self.cfg.prior.clip_shape()?;
                stored_condition(samples, tokens, dim, self.device)
            }
            TextFeatureSource::Clip => {
                let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
                let mut text = self.encoder.encode(&captions)?;
                // z_t as stored (identical up to float noise; keeps both sources comparable).
                text.text_embeds = text_embeddings(samples, self.device);
                Ok(text)
            }
        }
    }

    pub fn null_condition(&self) -> &TextCondition {
        &self.null
    }

    pub fn held_out(&self) -> Option<&HeldOut> {
        self.held_out.as_ref()
    }

    /// Samples embeddings for the held-out captions at each guidance scale (noise seeded by
    /// `eval.seed`) and compares them with the true image embeddings and with z_t.
    pub fn evaluate(&self, guidance_scales: &[f64]) -> Result<Option<EvalReport>> {
        let Some(h) = &self.held_out else {
            return Ok(None);
        };
        let p = &self.cfg.prior;
        let settings = EvalSettings {
            sampling: self.model.sampling(p),
            guidance_scales: guidance_scales.to_vec(),
            candidates: p.candidates,
            seed: self.cfg.eval.seed,
        };
        self.model.evaluate(p, &settings, h, &self.null).map(Some)
    }

    fn to_batch(&self, b: &EmbeddingBatch) -> Result<PriorBatch> {
        check_convention(
            &self.cfg.prior,
            &b.samples,
            "data.train",
            &self.cfg.data.train,
        )?;
        let text = self.condition(&b.samples)?;
        let z = image_embeddings(&b.samples, self.device);
        let (dim, _) = self.cfg.prior.clip_shape()?;
        ensure!(
            z.size()[1] == dim,
            "data.train {}: embeddings of width {}, {}.embedding_dim is {dim}",
            self.cfg.data.train,
            z.size()[1],
            self.cfg.prior.model_key()
        );
        Ok(PriorBatch {
            image_embeds: z,
            text,
            position: b.position,
        })
    }
}

impl TrainTask for PriorTask {
    type Batch = PriorBatch;

    fn next_batch(&mut self, step: u64, _micro: usize) -> Result<PriorBatch> {
        self.step = step;
        let b = self.loader.next_batch()?;
        self.skipped_total = b.skipped_total;
        for r in &b.finished_epochs {
            eprintln!(
                "data: epoch {} done on rank {}: {} samples, {} skipped as malformed{}",
                r.epoch,
                self.loader_cfg.reader.rank,
                r.samples,
                r.skipped_read,
                r.errors_note()
            );
        }
        self.to_batch(&b)
    }

    fn loss(&mut self, batch: &PriorBatch) -> Result<StepOutput> {
        let z = &batch.image_embeds;
        let b = z.size()[0];
        // Classifier-free guidance: some samples see the null caption instead of theirs.
        let drop = Tensor::rand([b], (Kind::Float, self.device)).lt(self.cfg.prior.text_drop_prob);
        let text = batch.text.replace_rows(&drop, &self.null)?;
        let (per_sample, mut metrics) = match &self.model {
            Prior::Diffusion(model) => {
                let x0 = model.standardize(z);
                let t = self.diffusion.sample_timesteps(b, self.device);
                let noise = x0.randn_like();
                let x_t = self.diffusion.q_sample(&x0, &t, &noise)?;
                let out = model.forward_t(&x_t, &t, &text, true)?;
                let per_sample = self
                    .diffusion
                    .training_losses(&out, &x0, &x_t, &t, &noise)?
                    .loss;
                let quarters = loss_per_quarter(&per_sample, &t, self.diffusion.num_timesteps())?;
                (per_sample, quarters)
            }
            Prior::Autoregressive(model) => {
                let codes = model.codec.encode(z);
                let dot = model.codec.dot_token(z, &batch.text.text_embeds)?;
                // The dropped samples are fed the null dot token too: it is a function of z_t.
                let fed = dot.masked_fill(&drop, model.null_dot());
                let (code_nll, dot_nll) = model.loss(&text, &dot, &fed, &codes)?;
                let k = model.cfg.components as f64;
                let metrics = vec![
                    (
                        "loss_codes".to_string(),
                        code_nll.mean(Kind::Float).double_value(&[]),
                    ),
                    (
                        "loss_dot".to_string(),
                        dot_nll.mean(Kind::Float).double_value(&[]),
                    ),
                ];
                // Every predicted token weighs the same: K codes and one dot band.
                ((code_nll * k + dot_nll) / (k + 1.0), metrics)
            }
        };
        self.position = batch.position;
        metrics.push(("data_skipped".into(), self.skipped_total as f64));
        let every = self.cfg.eval.every;
        // Not at step 0: an untrained prior's samples say nothing and cost as much.
        if every > 0
            && self.step > 0
            && self.step.is_multiple_of(every)
            && self.last_eval != Some(self.step)
        {
            self.last_eval = Some(self.step);
            let scales = self.cfg.eval.guidance_scales.clone();
            if let Some(report) = self.evaluate(&scales)? {
                eprintln!("eval step {}: {}", self.step, report.summary());
                metrics.push(("heldout_baseline_cos_zt".into(), report.baseline));
                for r in report.rows {
                    let g = r.guidance_scale;
                    metrics.push((format!("heldout_cos_true_g{g}"), r.cos_true));
                    metrics.push((format!("heldout_cos_text_g{g}"), r.cos_text));
                    if let Some(m) = r.manifold {
                        metrics.push((format!("heldout_precision_g{g}"), m.precision));
                        metrics.push((format!("heldout_recall_g{g}"), m.recall));
                    }
                }
            }
        }
        Ok(StepOutput {
            loss: per_sample.mean(Kind::Float),
            samples: b as usize,
            metrics,
        })
    }

    fn data_state(&self) -> serde_json::Value {
        self.position.to_state()
    }

    fn restore_data_state(&mut self, state: &serde_json::Value) -> Result<()> {
        if let Some((loader, position)) = EmbeddingLoader::resume(&self.loader_cfg, state)? {
            self.loader = loader;
            self.position = position;
        }
        Ok(())
    }
}
