//! Reading captioned-image WebDataset shards (`KEY.jpg|png|webp` + `KEY.txt`, optional
//! `KEY.json`): the brace-expanded shard list is checked before any work, each rank reads its own
//! round-robin share, shard order and a sample buffer are shuffled from (seed, epoch), and a bad
//! sample — unreadable tar entry, missing image or caption, non-UTF-8 caption — is skipped and
//! counted instead of stopping the run.

use crate::shards::ShardError;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use webdataset::{Action, Error, Handler, Sample, Value, WebDataset};

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Which shards, and how to walk them.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// e.g. `data/shapes/train-{000000..000009}.tar`
    pub shards: String,
    pub rank: usize,
    pub world_size: usize,
    pub seed: u64,
    /// Shuffle the shard order each epoch.
    pub shard_shuffle: bool,
    /// Samples held for shuffling (0: read in order).
    pub shuffle_buffer: usize,
}

impl ReaderConfig {
    /// `shards` read once in file order by one process: no shuffling, no rank split.
    pub fn in_order(shards: impl Into<String>) -> Self {
        Self {
            shards: shards.into(),
            rank: 0,
            world_size: 1,
            seed: 0,
            shard_shuffle: false,
            shuffle_buffer: 0,
        }
    }
}

/// One good sample.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionedImage {
    pub key: String,
    /// The encoded image file and its extension.
    pub image: Vec<u8>,
    pub image_ext: String,
    pub caption: String,
    pub metadata: Option<serde_json::Value>,
}

/// Counts what the pipeline dropped (read errors) and what this reader rejected.
#[derive(Debug, Default, Clone)]
pub struct SkipCounter(Arc<AtomicU64>);

impl SkipCounter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    pub(crate) fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Handler for SkipCounter {
    fn handle(&self, _error: &Error) -> Action {
        self.bump();
        Action::Continue
    }
}

/// Every shard of `pattern`, which must exist.
pub fn shard_list(pattern: &str) -> Result<Vec<PathBuf>, ShardError> {
    let bad = |message: String| ShardError::Io {
        path: PathBuf::from(pattern),
        message,
    };
    let names = webdataset::braceexpand(pattern).map_err(|e| bad(e.to_string()))?;
    if names.is_empty() || pattern.trim().is_empty() {
        return Err(bad("the shard list is empty".into()));
    }
    names
        .into_iter()
        .map(PathBuf::from)
        .map(|p| {
            if p.is_file() {
                Ok(p)
            } else {
                Err(ShardError::Io {
                    path: p,
                    message: "shard not found".into(),
                })
            }
        })
        .collect()
}

/// This rank's round-robin share of `shards`; every rank must get at least one.
pub fn rank_shards(
    shards: &[PathBuf],
    rank: usize,
    world_size: usize,
) -> Result<Vec<PathBuf>, ShardError> {
    if world_size == 0 || rank >= world_size || shards.len() < world_size {
        return Err(ShardError::Io {
            path: shards.first().cloned().unwrap_or_default(),
            message: format!(
                "{} shards cannot be split over {world_size} ranks (rank {rank})",
                shards.len()
            ),
        });
    }
    Ok(shards
        .iter()
        .skip(rank)
        .step_by(world_size)
        .cloned()
        .collect())
}

/// Reads samples of one kind from the shards of one epoch; `parse` rejects (and so counts) bad
/// samples.
pub struct ShardReader<T = CaptionedImage> {
    dataset: WebDataset,
    skipped: SkipCounter,
    parse: fn(&Sample) -> Option<T>,
}

impl ShardReader<CaptionedImage> {
    /// The reader of captioned images for one epoch; errors (missing shards, bad splits) come
    /// before any reading.
    pub fn new(cfg: &ReaderConfig, epoch: u64) -> Result<Self, ShardError> {
        Self::with_parser(cfg, epoch, captioned)
    }
}

impl<T: Send + 'static> ShardReader<T> {
    pub fn with_parser(
        cfg: &ReaderConfig,
        epoch: u64,
        parse: fn(&Sample) -> Option<T>,
    ) -> Result<Self, ShardError> {
        let mine = rank_shards(&shard_list(&cfg.shards)?, cfg.rank, cfg.world_size)?;
        let skipped = SkipCounter::default();
        let seed = cfg.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (cfg.rank as u64) << 32;
        let urls: Vec<String> = mine
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let mut builder = WebDataset::builder_verbatim(urls)
            .node_split(webdataset::NodeSplit::None)
            .worker_split(false)
            .empty_check(false)
            .seed(seed)
            .deterministic(true)
            .handler(Arc::new(skipped.clone()));
        if cfg.shard_shuffle {
            builder = builder.shard_shuffle(mine.len());
        }
        let mut dataset = builder.build().map_err(|e| ShardError::Io {
            path: PathBuf::from(&cfg.shards),
            message: e.to_string(),
        })?;
        if cfg.shuffle_buffer > 0 {
            dataset = dataset.shuffle(cfg.shuffle_buffer);
        }
        Ok(Self {
            dataset,
            skipped,
            parse,
        })
    }

    /// The epoch's good samples; bad ones are counted in [`ShardReader::skipped`].
    pub fn iter(&self) -> impl Iterator<Item = T> + Send + 'static {
        let skipped = self.skipped.clone();
        let parse = self.parse;
        self.dataset
            .iter()
            .filter_map(move |item| match item.ok().and_then(|s| parse(&s)) {
                Some(sample) => Some(sample),
                None => {
                    skipped.bump();
                    None
                }
            })
    }

    /// Samples skipped so far this epoch.
    pub fn skipped(&self) -> u64 {
        self.skipped.get()
    }
}

pub(crate) fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Bytes(b) => Some(b.to_vec()),
        Value::Text(t) => Some(t.clone().into_bytes()),
        _ => None,
    }
}

fn captioned(s: &Sample) -> Option<CaptionedImage> {
    let key = s.key()?.to_string();
    let (image_ext, image) = IMAGE_EXTENSIONS
        .iter()
        .find_map(|ext| s.get(ext).and_then(bytes_of).map(|b| (ext.to_string(), b)))?;
    let caption = String::from_utf8(s.get("txt").and_then(bytes_of)?).ok()?;
    let metadata = s
        .get("json")
        .and_then(bytes_of)
        .and_then(|b| serde_json::from_slice(&b).ok());
    Some(CaptionedImage {
        key,
        image,
        image_ext,
        caption: caption.trim().to_string(),
        metadata,
    })
}
