//! `train-clip`: CLIP trained contrastively on captioned-image shards through the shared runtime
//! (checkpoints, EMA, SAM, logs, data parallelism), with held-out retrieval accuracy logged and,
//! optionally, NegCLIP's hard-negative captions (one word swapped) in the loss and the evaluation.

use std::rc::Rc;

use anyhow::{anyhow, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};
use unclip_data::images::ImageTransform;
use unclip_data::loader::{DataPosition, ImageBatch, ImageLoader, LoaderConfig, Restartable};
use unclip_data::reader::ReaderConfig;
use unclip_data::tokenizer::ClipTokenizer;
use unclip_data::word_swap::WordSwap;
use unclip_dist::ProcessGroup;
use unclip_train::config::Validate;
use unclip_train::{StepOutput, TrainTask};

use crate::config::ClipConfig;
use crate::loss::{
    contrastive_loss, contrastive_loss_with_negatives, hard_negative_accuracy, retrieval_top1,
    HardNegatives,
};
use crate::model::{init_clip_weights, Clip};

/// Synthetic shapes shards written before training when the configured ones are missing, so the
/// default configs run with nothing prepared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateShapes {
    pub count: u64,
    pub resolution: u32,
    pub seed: u64,
    #[serde(default = "default_shard_size")]
    pub shard_size: u64,
}

fn default_shard_size() -> u64 {
    1000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSet {
    /// Brace-expanded shard pattern, e.g. `data/shapes/train-{000000..000009}.tar`.
    pub shards: String,
    /// Write shapes shards matching the pattern's directory and prefix if they are missing.
    #[serde(default)]
    pub generate: Option<GenerateShapes>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipDataConfig {
    pub train: ShardSet,
    /// Held-out pairs for retrieval accuracy.
    pub held_out: ShardSet,
    /// Candidates per retrieval query (the held-out batch size).
    #[serde(default = "default_held_out_count")]
    pub held_out_count: usize,
    /// Disjoint sets of `held_out_count` candidates; the logged top-1 is their mean (one set of
    /// 64 is a noisy figure: ±4.5 points at 85 %).
    #[serde(default = "one")]
    pub held_out_groups: usize,
    #[serde(default)]
    pub image: ImageTransform,
    #[serde(default = "yes")]
    pub shard_shuffle: bool,
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Batches decoded ahead of the trainer.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Shard-reading threads per rank (the rank's shards are split between them).
    #[serde(default = "one")]
    pub workers: usize,
}

fn one() -> usize {
    1
}

fn default_held_out_count() -> usize {
    64
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipEvalConfig {
    /// Held-out retrieval every this many steps (0: never).
    #[serde(default = "default_eval_every")]
    pub every: u64,
}

impl Default for ClipEvalConfig {
    fn default() -> Self {
        Self {
            every: default_eval_every(),
        }
    }
}

fn default_eval_every() -> u64 {
    50
}

/// NegCLIP's hard negatives (Yuksekgonul et al. 2023): each caption's twin with one word swapped
/// for another of its group, e.g. one shape name for another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardNegativeConfig {
    /// Groups of interchangeable words (single words; case and punctuation are ignored).
    pub swap: Vec<Vec<String>>,
    /// Add each image's negative to its image→text softmax; false: only measure, on the held-out
    /// pairs, how often the caption beats its twin.
    #[serde(default = "yes")]
    pub train: bool,
}

/// The task's sections of a `train-clip` config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipTrainConfig {
    pub model: ClipConfig,
    pub data: ClipDataConfig,
    #[serde(default)]
    pub eval: ClipEvalConfig,
    #[serde(default)]
    pub hard_negatives: Option<HardNegativeConfig>,
    /// Recompute the transformer layers' activations in backward instead of keeping them
    /// ([`Clip::set_gradient_checkpointing`]): less memory for more compute.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

impl Validate for ClipTrainConfig {
    fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.data
            .image
            .validate()
            .map_err(|e| anyhow!("data.{e}"))?;
        ensure!(
            i64::from(self.data.image.resolution) == self.model.vision.image_size,
            "data.image.resolution ({}) must equal model.vision.image_size ({})",
            self.data.image.resolution,
            self.model.vision.image_size
        );
        ensure!(
            self.data.held_out_count >= 2,
            "data.held_out_count must be at least 2"
        );
        ensure!(
            self.data.held_out_groups >= 1,
            "data.held_out_groups must be at least 1"
        );
        if let Some(h) = &self.hard_negatives {
            WordSwap::new(&h.swap).map_err(|e| anyhow!("hard_negatives.swap: {e}"))?;
        }
        for (key, set) in [
            ("data.train", &self.data.train),
            ("data.held_out", &self.data.held_out),
        ] {
            ensure!(
                !set.shards.trim().is_empty(),
                "{key}.shards must name shards"
            );
            if let Some(g) = &set.generate {
                ensure!(
                    g.count > 0 && g.shard_size > 0 && (32..=1024).contains(&g.resolution),
                    "{key}.generate: count and shard_size must be > 0, resolution 32..=1024"
                );
            }
        }
        Ok(())
    }
}

/// Writes the shapes shards of `set` when its pattern matches none on disk.
pub fn ensure_shards(set: &ShardSet) -> Result<()> {
    let Some(g) = &set.generate else {
        return Ok(());
    };
    // Streamed shards are never generated; a bad URL is the reader's error.
    if unclip_data::reader::is_streamed(&set.shards)
        || unclip_data::reader::shard_list(&set.shards).is_ok()
    {
        return Ok(());
    }
    let path = std::path::Path::new(&set.shards);
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .context("shard pattern has no file name")?;
    let prefix = file.split_once('-').map(|(p, _)| p).with_context(|| {
        format!(
            "{}: generated shards are named PREFIX-NNNNNN.tar",
            set.shards
        )
    })?;
    let spec = unclip_data::shards::ShapesSpec {
        count: g.count,
        resolution: g.resolution,
        seed: g.seed,
        shard_size: g.shard_size,
        out: dir.to_path_buf(),
        prefix: prefix.to_string(),
    };
    let written = unclip_data::shards::write_shapes_shards(&spec)?;
    unclip_data::reader::shard_list(&set.shards).with_context(|| {
        format!(
            "generated {} shards in {}, but {} does not match them",
            written.len(),
            dir.display(),
            set.shards
        )
    })?;
    Ok(())
}

/// What must differ between held-out candidates for retrieval to be well posed. With scene
/// metadata (the shapes dataset's `KEY.json`), the set of (colour, shape) objects: captions often
/// leave size and background out, so two scenes with the same objects can both match one caption.
/// Otherwise the caption, case- and space-normalised.
pub fn retrieval_signature(caption: &str, metadata: Option<&serde_json::Value>) -> String {
    let objects = metadata
        .and_then(|m| m.get("objects"))
        .and_then(|o| o.as_array());
    if let Some(objects) = objects {
        let mut parts: Vec<String> = objects
            .iter()
            .map(|o| {
                let field = |k: &str| o.get(k).and_then(|v| v.as_str()).unwrap_or("?");
                format!("{} {}", field("colour"), field("shape"))
            })
            .collect();
        parts.sort();
        return parts.join(",");
    }
    caption
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Seeds of the held-out pairs' hard negatives (fixed) and, mixed with the run's seed, the training
/// batches' (a function of seed, step and rank, so a resumed run draws the same ones).
const HELD_OUT_NEGATIVES: u64 = 0x4E45_4743_4C49_5031;
const TRAIN_NEGATIVES: u64 = 0x4E45_4743_4C49_5032;

/// Held-out metrics: top-1 retrieval both ways and, with `hard_negatives`, how often an image's
/// caption is closer to it than the caption's one-word twin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOutEval {
    pub i2t: f64,
    pub t2i: f64,
    pub hard_negatives: Option<f64>,
}

pub struct ClipBatch {
    pub pixels: Tensor,
    pub ids: Tensor,
    /// Token ids of each caption's hard negative and whether it has one (`hard_negatives`).
    negatives: Option<(Tensor, Tensor)>,
    position: DataPosition,
}

pub struct ClipTask {
    pub model: Clip,
    tokenizer: ClipTokenizer,
    loader: ImageLoader,
    loader_cfg: LoaderConfig,
    held_out: Option<ClipBatch>,
    word_swap: Option<WordSwap>,
    seed: u64,
    rank: usize,
    cfg: ClipTrainConfig,
    device: Device,
    group: Option<Rc<ProcessGroup>>,
    step: u64,
    last_eval: Option<u64>,
    position: DataPosition,
    skipped_total: u64,
}

impl ClipTask {
    /// Builds CLIP at the root of `vs` (transformers' names) with CLIP's initialisation and
    /// starts the data stream for `rank` of `world_size`.
    pub fn new(
        vs: &nn::VarStore,
        cfg: &ClipTrainConfig,
        seed: u64,
        batch_size: usize,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        let mut model = Clip::new(vs.root(), &cfg.model)?;
        model.set_gradient_checkpointing(cfg.gradient_checkpointing);
        init_clip_weights(vs, &cfg.model, "");
        model.set_training(true);
        let loader_cfg = LoaderConfig {
            reader: ReaderConfig {
                shards: cfg.data.train.shards.clone(),
                rank,
                world_size,
                seed,
                shard_shuffle: cfg.data.shard_shuffle,
                shuffle_buffer: cfg.data.shuffle_buffer,
            },
            transform: cfg.data.image.clone(),
            batch_size,
            prefetch: cfg.data.prefetch,
            start: DataPosition::default(),
            embeddings: None,
            workers: cfg.data.workers,
        };
        let loader = ImageLoader::start(loader_cfg.clone())
            .with_context(|| format!("data.train.shards {}", cfg.data.train.shards))?;
        let tokenizer = ClipTokenizer::new();
        let word_swap = cfg
            .hard_negatives
            .as_ref()
            .map(|h| WordSwap::new(&h.swap).map_err(|e| anyhow!("hard_negatives.swap: {e}")))
            .transpose()?;
        let mut task = Self {
            model,
            tokenizer,
            loader,
            loader_cfg,
            held_out: None,
            word_swap,
            seed,
            rank,
            cfg: cfg.clone(),
            device: vs.device(),
            group: None,
            step: 0,
            last_eval: None,
            position: DataPosition::default(),
            skipped_total: 0,
        };
        if cfg.eval.every > 0 && rank == 0 {
            task.held_out = Some(task.load_held_out()?);
        }
        Ok(task)
    }

    /// `held_out_groups` disjoint groups of `held_out_count` held-out pairs, each group's pairs
    /// distinguishable from one another (see [`retrieval_signature`]), taken group by group in
    /// file order from the first `4 · count · groups` samples; centre-cropped, unflipped.
    fn load_held_out(&self) -> Result<ClipBatch> {
        let d = &self.cfg.data;
        let pool = d.held_out_count * d.held_out_groups * 4;
        let mut loader = ImageLoader::start(LoaderConfig {
            reader: ReaderConfig::in_order(d.held_out.shards.clone()),
            transform: ImageTransform {
                crop: unclip_data::images::Crop::Center,
                random_flip: false,
                ..d.image.clone()
            },
            batch_size: pool,
            prefetch: 1,
            start: DataPosition::default(),
            embeddings: None,
            workers: 1,
        })
        .with_context(|| format!("data.held_out.shards {}", d.held_out.shards))?;
        let batch = loader.next_batch()?;
        let numel = d.image.numel();
        let mut used = vec![false; batch.len()];
        let mut picked = ImageBatch {
            keys: Vec::new(),
            captions: Vec::new(),
            metadata: Vec::new(),
            images: Vec::new(),
            ..batch.clone()
        };
        for group in 0..d.held_out_groups {
            let mut seen = std::collections::HashSet::new();
            for (i, taken) in used.iter_mut().enumerate() {
                if seen.len() == d.held_out_count {
                    break;
                }
                let signature = retrieval_signature(&batch.captions[i], batch.metadata[i].as_ref());
                if !*taken && seen.insert(signature) {
                    *taken = true;
                    picked.keys.push(batch.keys[i].clone());
                    picked.captions.push(batch.captions[i].clone());
                    picked.metadata.push(batch.metadata[i].clone());
                    picked
                        .images
                        .extend_from_slice(&batch.images[i * numel..(i + 1) * numel]);
                }
            }
            ensure!(
                seen.len() == d.held_out_count,
                "data.held_out.shards {}: group {} of {} has only {} distinguishable pairs among the first {pool} samples, {} needed (data.held_out_count × data.held_out_groups × 4 samples are read)",
                d.held_out.shards,
                group + 1,
                d.held_out_groups,
                seen.len(),
                d.held_out_count
            );
        }
        self.to_batch(&picked, Some(HELD_OUT_NEGATIVES))
    }

    /// `negative_seed`: draw each caption's hard negative from this seed (with `hard_negatives`).
    fn to_batch(&self, b: &ImageBatch, negative_seed: Option<u64>) -> Result<ClipBatch> {
        let r = i64::from(b.resolution);
        let pixels = Tensor::from_slice(&b.images)
            .view([b.len() as i64, 3, r, r])
            .to_device(self.device);
        let ctx = self.cfg.model.text.context_length as usize;
        let tokenize = |captions: &[String]| {
            Tensor::from_slice(&self.tokenizer.tokenize_batch(captions, ctx))
                .view([captions.len() as i64, ctx as i64])
                .to_device(self.device)
        };
        let negatives = match (&self.word_swap, negative_seed) {
            (Some(swap), Some(seed)) => {
                let drawn = swap.negatives(&b.captions, seed);
                let valid: Vec<bool> = drawn.iter().map(Option::is_some).collect();
                // A caption with no word to swap stands in for its own negative, masked out.
                let texts: Vec<String> = drawn
                    .into_iter()
                    .zip(&b.captions)
                    .map(|(n, c)| n.unwrap_or_else(|| c.clone()))
                    .collect();
                Some((
                    tokenize(&texts),
                    Tensor::from_slice(&valid).to_device(self.device),
                ))
            }
            _ => None,
        };
        Ok(ClipBatch {
            pixels,
            ids: tokenize(&b.captions),
            negatives,
            position: b.position,
        })
    }

    /// The held-out metrics from one pass of the towers in evaluation mode, without gradients:
    /// (image→text, text→image) top-1 among `held_out_count` candidates, the mean over the
    /// `held_out_groups` groups, and the hard-negative accuracy.
    pub fn held_out_eval(&self) -> Result<Option<HeldOutEval>> {
        let Some(h) = &self.held_out else {
            return Ok(None);
        };
        let (img, txt, neg) = self.embed_eval(h)?;
        let n = self.cfg.data.held_out_count as i64;
        let groups = self.cfg.data.held_out_groups;
        let (mut i2t, mut t2i) = (0.0, 0.0);
        for g in 0..groups as i64 {
            let (a, b) = retrieval_top1(&img.narrow(0, g * n, n), &txt.narrow(0, g * n, n))?;
            i2t += a;
            t2i += b;
        }
        let hard_negatives = match (&neg, &h.negatives) {
            (Some(neg), Some((_, valid))) => hard_negative_accuracy(
                &img,
                &txt,
                &HardNegatives {
                    text_embeds: neg,
                    valid,
                },
            )?,
            _ => None,
        };
        Ok(Some(HeldOutEval {
            i2t: i2t / groups as f64,
            t2i: t2i / groups as f64,
            hard_negatives,
        }))
    }

    /// Image, caption and (with hard negatives) twin embeddings without gradients and in
    /// evaluation mode (the ResNet's norms on their running statistics), as `embed` will compute
    /// them; captions and twins in one pass of the text tower.
    fn embed_eval(&self, batch: &ClipBatch) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let _g = tch::no_grad_guard();
        let was = self.model.set_training(false);
        let out = self.model.encode_image(&batch.pixels).and_then(|img| {
            let (txt, neg) = self.encode_captions(batch)?;
            Ok((img, txt, neg))
        });
        self.model.set_training(was);
        out
    }

    /// The batch's caption embeddings and, with hard negatives, their twins', from one pass of
    /// the text tower.
    fn encode_captions(&self, batch: &ClipBatch) -> Result<(Tensor, Option<Tensor>)> {
        let Some((neg_ids, _)) = &batch.negatives else {
            return Ok((self.model.encode_text(&batch.ids)?.embeds, None));
        };
        let both = self
            .model
            .encode_text(&Tensor::f_cat(&[&batch.ids, neg_ids], 0)?)?
            .embeds;
        let b = batch.ids.size()[0];
        Ok((both.narrow(0, 0, b), Some(both.narrow(0, b, b))))
    }
}

impl TrainTask for ClipTask {
    type Batch = ClipBatch;

    fn next_batch(&mut self, step: u64, _micro: usize) -> Result<ClipBatch> {
        self.step = step;
        let b = self.loader.next_batch()?;
        self.skipped_total = b.skipped_total;
        for r in &b.finished_epochs {
            eprintln!("{}", r.message(self.loader_cfg.reader.rank));
        }
        let train_negatives = self.cfg.hard_negatives.as_ref().is_some_and(|h| h.train);
        let seed = train_negatives.then(|| {
            unclip_data::loader::sample_seed(self.seed ^ TRAIN_NEGATIVES, step, self.rank, 0)
        });
        self.to_batch(&b, seed)
    }

    fn loss(&mut self, batch: &ClipBatch) -> Result<StepOutput> {
        let image = self.model.encode_image(&batch.pixels)?;
        let scale = self.model.logit_scale();
        let mut metrics = vec![
            ("logit_scale".to_string(), scale.double_value(&[])),
            ("data_skipped".to_string(), self.skipped_total as f64),
        ];
        let (text, neg) = self.encode_captions(batch)?;
        let out = match (&neg, &batch.negatives) {
            (Some(neg), Some((_, valid))) => {
                let negatives = HardNegatives {
                    text_embeds: neg,
                    valid,
                };
                if let Some(acc) =
                    tch::no_grad(|| hard_negative_accuracy(&image, &text, &negatives))?
                {
                    metrics.push(("batch_hard_negative_accuracy".into(), acc));
                }
                contrastive_loss_with_negatives(
                    &image,
                    &text,
                    &negatives,
                    &scale,
                    self.group.as_deref(),
                )?
            }
            _ => contrastive_loss(&image, &text, &scale, self.group.as_deref())?,
        };
        self.position = batch.position;
        let (i2t, t2i) = tch::no_grad(|| retrieval_top1(&image, &text))?;
        metrics.push(("batch_i2t_top1".into(), i2t));
        metrics.push(("batch_t2i_top1".into(), t2i));
        let every = self.cfg.eval.every;
        if every > 0 && self.step.is_multiple_of(every) && self.last_eval != Some(self.step) {
            self.last_eval = Some(self.step);
            if let Some(e) = self.held_out_eval()? {
                metrics.push(("heldout_i2t_top1".into(), e.i2t));
                metrics.push(("heldout_t2i_top1".into(), e.t2i));
                if let Some(acc) = e.hard_negatives {
                    metrics.push(("heldout_hard_negative_accuracy".into(), acc));
                }
            }
        }
        Ok(StepOutput {
            loss: out.loss,
            samples: batch.pixels.size()[0] as usize,
            metrics,
        })
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

    /// The held-out image–text similarity matrix (bright diagonal = right matches).
    fn images(&mut self, _step: u64) -> Result<Vec<(String, Tensor)>> {
        let Some(h) = &self.held_out else {
            return Ok(Vec::new());
        };
        let (img, txt, _) = self.embed_eval(h)?;
        let n = self.cfg.data.held_out_count as i64; // the first group's matrix
        let img = unclip_diffusion::embedding::l2_normalize(&img.narrow(0, 0, n))?;
        let txt = unclip_diffusion::embedding::l2_normalize(&txt.narrow(0, 0, n))?;
        let sim = img
            .matmul(&txt.tr())
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        let (lo, hi) = (sim.min().double_value(&[]), sim.max().double_value(&[]));
        let sim = (sim - lo) / (hi - lo).max(1e-6);
        let n = sim.size()[0];
        let big = sim
            .view([1, 1, n, n])
            .upsample_nearest2d([n * 4, n * 4], None, None)
            .view([1, n * 4, n * 4])
            .expand([3, n * 4, n * 4], false)
            .contiguous();
        Ok(vec![("heldout_similarity".into(), big)])
    }

    fn set_process_group(&mut self, group: Rc<ProcessGroup>) {
        self.group = Some(group);
    }
}
