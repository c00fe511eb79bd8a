//! Batches of transformed images with their captions, produced ahead of the trainer: a background
//! thread walks the shards epoch after epoch, decodes and transforms each batch in parallel (rayon)
//! and keeps at most `prefetch` batches queued.
//!
//! Deterministic for a seed and a rank: the sample order comes from the reader, and each sample's
//! random crop / flip from (seed, epoch, rank, position in the epoch), never from thread timing.
//! Every batch carries the stream position after it, so a checkpoint can resume the stream exactly.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::embeddings::{EmbeddingSample, PairedShardReader};
use crate::images::ImageTransform;
use crate::prefetch::Prefetch;
use crate::reader::{CaptionedImage, ReaderConfig, ShardReader, SkipCounter};
use crate::shards::ShardError;

/// Where a stream stands: `samples` samples of epoch `epoch` have been consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub samples: u64,
}

impl DataPosition {
    /// As a checkpoint stores it (`TrainTask::data_state`).
    pub fn to_state(self) -> serde_json::Value {
        serde_json::json!({"epoch": self.epoch, "samples": self.samples})
    }

    /// A checkpoint's data state; None for a checkpoint that stored none.
    pub fn from_state(state: &serde_json::Value) -> Result<Option<Self>, ShardError> {
        if state.is_null() {
            return Ok(None);
        }
        serde_json::from_value(state.clone())
            .map(Some)
            .map_err(|e| ShardError::DataState(e.to_string()))
    }
}

/// A batch loader that can start anywhere in its stream: what a training task resumes.
pub trait Restartable: Sized {
    type Config: Clone;

    /// The loader of `cfg`, started at `position` instead of `cfg`'s own start.
    fn start_at(cfg: &Self::Config, position: DataPosition) -> Result<Self, ShardError>;

    /// The loader restarted where a checkpoint's data state (`DataPosition::to_state`) says, with
    /// that position; None when the checkpoint stored none (keep the running loader).
    fn resume(
        cfg: &Self::Config,
        state: &serde_json::Value,
    ) -> Result<Option<(Self, DataPosition)>, ShardError> {
        let Some(position) = DataPosition::from_state(state)? else {
            return Ok(None);
        };
        Ok(Some((Self::start_at(cfg, position)?, position)))
    }
}

impl Restartable for ImageLoader {
    type Config = LoaderConfig;

    fn start_at(cfg: &LoaderConfig, start: DataPosition) -> Result<Self, ShardError> {
        Self::start(LoaderConfig {
            start,
            ..cfg.clone()
        })
    }
}

/// What one finished epoch read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochReport {
    pub epoch: u64,
    /// Samples that made it into batches.
    pub samples: u64,
    /// Unreadable tar entries, missing image or caption, non-UTF-8 caption.
    pub skipped_read: u64,
    /// Images that would not decode.
    pub skipped_decode: u64,
    /// The first read errors' messages (a shard that failed names its path or URL).
    pub read_errors: Vec<String>,
}

impl EpochReport {
    /// The line trainers log for it on `rank`.
    pub fn message(&self, rank: usize) -> String {
        format!(
            "data: epoch {} done on rank {rank}: {} samples, {} skipped as unreadable, {} undecodable{}",
            self.epoch,
            self.samples,
            self.skipped_read,
            self.skipped_decode,
            self.errors_note()
        )
    }

    /// `; read errors: …` when there were any, else empty.
    pub fn errors_note(&self) -> String {
        if self.read_errors.is_empty() {
            String::new()
        } else {
            format!("; read errors: {}", self.read_errors.join(" | "))
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImageBatch {
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    pub metadata: Vec<Option<serde_json::Value>>,
    /// `[len, 3, resolution, resolution]`, row-major.
    pub images: Vec<f32>,
    pub resolution: u32,
    /// Stream position after this batch.
    pub position: DataPosition,
    /// Epochs that ended while this batch was assembled.
    pub finished_epochs: Vec<EpochReport>,
    /// Samples skipped since the loader started.
    pub skipped_total: u64,
    /// With `LoaderConfig::embeddings`: each sample's embedding record — its L2-normalised image
    /// and text embeddings, and its token features when `embed --token-features` wrote them
    /// (empty otherwise).
    pub embeddings: Vec<EmbeddingSample>,
}

impl ImageBatch {
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub reader: ReaderConfig,
    pub transform: ImageTransform,
    pub batch_size: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    pub start: DataPosition,
    /// Read each image with its precomputed embeddings from the embedding shards of this
    /// directory (same file names and keys as the image shards; see `crate::embeddings`).
    pub embeddings: Option<PathBuf>,
    /// Reader threads per rank, each with its own share of the rank's shards (1: one reader).
    pub workers: usize,
}

pub struct ImageLoader {
    batches: Prefetch<ImageBatch>,
}

/// A well-mixed seed for one (epoch, rank, index) of a run seeded with `seed`.
pub fn sample_seed(seed: u64, epoch: u64, rank: usize, index: u64) -> u64 {
    let mut h = seed ^ 0x51_7C_C1_B7_27_22_0A_95;
    for v in [epoch, rank as u64, index] {
        h = (h ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
    }
    h
}

struct Transformed {
    sample: CaptionedImage,
    embedding: Option<EmbeddingSample>,
    pixels: Vec<f32>,
}

/// One raw sample and, when reading embeddings, its embedding.
type Raw = (CaptionedImage, Option<EmbeddingSample>);
type RawIter = Box<dyn Iterator<Item = Result<Raw, ShardError>> + Send>;

/// One epoch's stream and the counters of what its readers skipped, and why.
struct Epoch {
    iter: RawIter,
    counters: Vec<SkipCounter>,
}

impl Epoch {
    fn skipped(&self) -> u64 {
        self.counters.iter().map(SkipCounter::get).sum()
    }
    fn errors(&self) -> Vec<String> {
        self.counters.iter().flat_map(SkipCounter::errors).collect()
    }
}

/// One reader's stream over the shards `reader` selects.
fn open_stream(
    cfg: &LoaderConfig,
    reader: &ReaderConfig,
    epoch: u64,
    check: bool,
) -> Result<Epoch, ShardError> {
    Ok(match &cfg.embeddings {
        None => {
            let reader = ShardReader::new(reader, epoch)?;
            Epoch {
                counters: vec![reader.counter()],
                iter: Box::new(reader.iter().map(|s| Ok((s, None)))),
            }
        }
        Some(dir) => {
            let reader = PairedShardReader::open(reader, dir, epoch, check)?;
            Epoch {
                counters: vec![reader.counter()],
                iter: Box::new(reader.iter().map(|r| r.map(|(s, e)| (s, Some(e))))),
            }
        }
    })
}

/// This rank's stream for one epoch. With `workers` > 1 the rank's shards are split again
/// between reader threads (worker w of W reads as rank `rank·W + w` of `world·W`), whose samples
/// are interleaved round robin: a fixed order, so streams and resumes stay deterministic.
/// `check`: read the first shard pair ahead (at the start only; see `PairedShardReader::open`).
fn open_epoch(cfg: &LoaderConfig, epoch: u64, check: bool) -> Result<Epoch, ShardError> {
    let workers = cfg.workers.max(1);
    if workers == 1 {
        return open_stream(cfg, &cfg.reader, epoch, check);
    }
    let mut receivers = Vec::with_capacity(workers);
    let mut counters = Vec::with_capacity(workers);
    for w in 0..workers {
        let reader = ReaderConfig {
            rank: cfg.reader.rank * workers + w,
            world_size: cfg.reader.world_size * workers,
            ..cfg.reader.clone()
        };
        let Epoch { iter, counters: c } =
            open_stream(cfg, &reader, epoch, check).map_err(|e| ShardError::Io {
                path: cfg.reader.shards.clone().into(),
                message: format!("reader worker {w} of {workers}: {e}"),
            })?;
        let (tx, rx) = sync_channel(64);
        std::thread::Builder::new()
            .name(format!("unclip-reader-{w}"))
            .spawn(move || {
                for item in iter {
                    if tx.send(item).is_err() {
                        return; // the epoch was dropped
                    }
                }
            })
            .map_err(|e| ShardError::Io {
                path: "<reader thread>".into(),
                message: e.to_string(),
            })?;
        receivers.push(rx);
        counters.extend(c);
    }
    Ok(Epoch {
        iter: Box::new(RoundRobin { receivers, next: 0 }),
        counters,
    })
}

/// Takes one item from each stream in turn, dropping streams as they end.
struct RoundRobin {
    receivers: Vec<Receiver<Result<Raw, ShardError>>>,
    next: usize,
}

impl Iterator for RoundRobin {
    type Item = Result<Raw, ShardError>;
    fn next(&mut self) -> Option<Self::Item> {
        while !self.receivers.is_empty() {
            let i = self.next % self.receivers.len();
            match self.receivers[i].recv() {
                Ok(item) => {
                    self.next = i + 1;
                    return Some(item);
                }
                Err(_) => {
                    self.receivers.remove(i);
                    self.next = i;
                }
            }
        }
        None
    }
}

impl ImageLoader {
    /// Checks the shard list and the config, then starts the background thread.
    pub fn start(cfg: LoaderConfig) -> Result<Self, ShardError> {
        let invalid = |message: String| ShardError::Io {
            path: cfg.reader.shards.clone().into(),
            message,
        };
        cfg.transform.validate().map_err(invalid)?;
        if cfg.batch_size == 0 {
            return Err(invalid("batch_size must be at least 1".into()));
        }
        // Missing shards, impossible rank splits and embedding shards that do not belong fail
        // here, before training starts.
        open_epoch(&cfg, cfg.start.epoch, true)?;
        let depth = cfg.prefetch;
        let mut producer = Producer::new(cfg);
        Ok(Self {
            batches: Prefetch::spawn("unclip-loader", depth, move || producer.next_batch())?,
        })
    }

    /// The next batch (blocks until it is ready).
    pub fn next_batch(&mut self) -> Result<ImageBatch, ShardError> {
        self.batches.next()
    }
}

struct Producer {
    cfg: LoaderConfig,
    position: DataPosition,
    reader: Option<Epoch>,
    epoch_samples: u64,
    epoch_decode_skips: u64,
    skipped_total: u64,
    pending: Vec<Transformed>,
    finished: Vec<EpochReport>,
}

impl Producer {
    fn new(cfg: LoaderConfig) -> Self {
        Self {
            position: cfg.start,
            cfg,
            reader: None,
            epoch_samples: 0,
            epoch_decode_skips: 0,
            skipped_total: 0,
            pending: Vec::new(),
            finished: Vec::new(),
        }
    }

    /// Up to `n` raw samples of the current epoch, opening epochs as needed; empty at epoch end.
    fn pull(&mut self, n: usize) -> Result<Vec<(u64, Raw)>, ShardError> {
        if self.reader.is_none() {
            let mut epoch = open_epoch(&self.cfg, self.position.epoch, false)?;
            // Resuming inside an epoch: the order is deterministic, so skip what was consumed.
            for _ in 0..self.position.samples {
                match epoch.iter.next() {
                    Some(r) => {
                        r?;
                        // Batched before the resume: the epoch did yield them (a checkpoint
                        // taken exactly at the epoch's end resumes into an empty remainder).
                        self.epoch_samples += 1;
                    }
                    None => break,
                }
            }
            self.reader = Some(epoch);
        }
        let epoch = self.reader.as_mut().expect("opened above");
        let mut out = Vec::with_capacity(n);
        for sample in epoch.iter.by_ref().take(n) {
            out.push((self.position.samples, sample?));
            self.position.samples += 1;
        }
        Ok(out)
    }

    fn end_epoch(&mut self) -> Result<(), ShardError> {
        let epoch = self.reader.take().expect("an open epoch");
        let skipped_read = epoch.skipped();
        self.skipped_total += skipped_read;
        if self.epoch_samples == 0 {
            return Err(ShardError::Io {
                path: self.cfg.reader.shards.clone().into(),
                message: format!(
                    "epoch {} yielded no usable samples ({} skipped as unreadable, {} undecodable)",
                    self.position.epoch, skipped_read, self.epoch_decode_skips
                ),
            });
        }
        self.finished.push(EpochReport {
            epoch: self.position.epoch,
            samples: self.epoch_samples,
            skipped_read,
            skipped_decode: self.epoch_decode_skips,
            read_errors: epoch.errors(),
        });
        self.position = DataPosition {
            epoch: self.position.epoch + 1,
            samples: 0,
        };
        self.epoch_samples = 0;
        self.epoch_decode_skips = 0;
        Ok(())
    }

    fn next_batch(&mut self) -> Result<ImageBatch, ShardError> {
        let b = self.cfg.batch_size;
        while self.pending.len() < b {
            let raw = self.pull(b - self.pending.len())?;
            if raw.is_empty() {
                self.end_epoch()?;
                continue;
            }
            let (seed, epoch, rank) = (
                self.cfg.reader.seed,
                self.position.epoch,
                self.cfg.reader.rank,
            );
            let transform = &self.cfg.transform;
            let done: Vec<Option<Transformed>> = raw
                .into_par_iter()
                .map(|(index, (sample, embedding))| {
                    let mut rng = ChaCha8Rng::seed_from_u64(sample_seed(seed, epoch, rank, index));
                    let mut pixels = vec![0.0; transform.numel()];
                    transform
                        .apply(&sample.image, &mut rng, &mut pixels)
                        .ok()
                        .map(|()| Transformed {
                            sample,
                            embedding,
                            pixels,
                        })
                })
                .collect();
            for t in done {
                match t {
                    Some(t) => {
                        self.epoch_samples += 1;
                        self.pending.push(t);
                    }
                    None => {
                        self.epoch_decode_skips += 1;
                        self.skipped_total += 1;
                    }
                }
            }
        }
        let items: Vec<Transformed> = self.pending.drain(..b).collect();
        let mut batch = ImageBatch {
            keys: Vec::with_capacity(b),
            captions: Vec::with_capacity(b),
            metadata: Vec::with_capacity(b),
            images: Vec::with_capacity(b * self.cfg.transform.numel()),
            resolution: self.cfg.transform.resolution,
            position: self.position,
            finished_epochs: std::mem::take(&mut self.finished),
            skipped_total: self.skipped_total + self.reader.as_ref().map_or(0, Epoch::skipped),
            embeddings: Vec::new(),
        };
        for t in items {
            batch.keys.push(t.sample.key);
            batch.captions.push(t.sample.caption);
            batch.metadata.push(t.sample.metadata);
            batch.images.extend_from_slice(&t.pixels);
            batch.embeddings.extend(t.embedding);
        }
        Ok(batch)
    }
}
