//! Reading captioned-image WebDataset shards (`KEY.jpg|png|webp` + `KEY.txt`, optional
//! `KEY.json`), local or streamed from URLs (`pipe:`, `https://`, …): the brace-expanded shard
//! list is checked before any work, each rank reads its own
//! round-robin share, shard order and a sample buffer are shuffled from (seed, epoch), and a bad
//! sample — unreadable tar entry, missing image or caption, non-UTF-8 caption — is skipped and
//! counted instead of stopping the run.

use crate::shards::ShardError;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use webdataset::io::{gopen, url};
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

/// Counts what the pipeline dropped (read errors) and what this reader rejected, and keeps the
/// first read errors' messages — a remote shard that fails names its URL there.
#[derive(Debug, Default, Clone)]
pub struct SkipCounter {
    count: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
}

/// Read-error messages kept per reader: enough to name the failing shards, bounded when a whole
/// bucket is unreachable.
const KEPT_ERRORS: usize = 8;

impl SkipCounter {
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    pub(crate) fn bump(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    /// The first read errors (at most 8), in the order met.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
    fn keep(&self, message: String) {
        if let Ok(mut kept) = self.errors.lock() {
            if kept.len() < KEPT_ERRORS {
                kept.push(message);
            }
        }
    }
    /// Takes in `other`'s error messages, and its count when `count`.
    pub(crate) fn absorb(&self, other: &SkipCounter, count: bool) {
        if count {
            self.count.fetch_add(other.get(), Ordering::Relaxed);
        }
        for message in other.errors() {
            self.keep(message);
        }
    }
}

impl Handler for SkipCounter {
    fn handle(&self, error: &Error) -> Action {
        self.bump();
        self.keep(error.to_string());
        Action::Continue
    }
}

/// Every shard of `pattern`: local files, which must exist, or WebDataset URLs, streamed as
/// Python's webdataset streams them — `pipe:COMMAND` (the command's standard output is the tar:
/// `pipe:aws s3 cp s3://bucket/train-000000.tar -`), `http://` / `https://` (curl), `gs://`
/// (gsutil), `hf://`, `ais://`, `file:` — whose scheme must have a reader. A remote shard cannot
/// be checked without reading it; one that fails while read is skipped and reported
/// ([`SkipCounter::errors`]).
pub fn shard_list(pattern: &str) -> Result<Vec<PathBuf>, ShardError> {
    let bad = |message: String| ShardError::Io {
        path: PathBuf::from(pattern),
        message,
    };
    let names = webdataset::braceexpand(pattern).map_err(|e| bad(e.to_string()))?;
    if names.is_empty() || pattern.trim().is_empty() {
        return Err(bad("the shard list is empty".into()));
    }
    names.into_iter().map(|name| check_shard(&name)).collect()
}

/// Whether `shards` names streamed shards (a URL other than `file:`) rather than local files.
pub fn is_streamed(shards: &str) -> bool {
    !url::is_local(shards)
}

fn check_shard(name: &str) -> Result<PathBuf, ShardError> {
    let err = |message: String| ShardError::Io {
        path: PathBuf::from(name),
        message,
    };
    match url::scheme(name) {
        None | Some("file") => {
            let local = PathBuf::from(url::to_local_path(name));
            if local.is_file() {
                Ok(PathBuf::from(name))
            } else {
                Err(err("shard not found".into()))
            }
        }
        Some(scheme) if gopen::scheme_handler(scheme).is_some() => Ok(PathBuf::from(name)),
        Some(scheme) => Err(err(format!(
            "no reader for {scheme}: URLs (these are: {}); stream it through a command instead, \
             e.g. pipe:aws s3 cp s3://bucket/train-000000.tar -",
            gopen::registered_schemes()
                .iter()
                .map(|s| format!("{s}:"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The file name a shard goes by — what `embed` names its embedding shard after: a path's or
/// URL's last component, or for `pipe:` the last word of the command that names a `.tar` or
/// `.tgz`.
pub fn shard_name(shard: &Path) -> Result<String, ShardError> {
    let text = shard.to_string_lossy();
    let err = || ShardError::Io {
        path: shard.to_path_buf(),
        message: "cannot tell the shard's file name (for a pipe: command, the last word \
                  with .tar or .tgz in it)"
            .into(),
    };
    let located = match text.strip_prefix("pipe:") {
        Some(command) => command
            .split_whitespace()
            .map(|word| word.trim_matches(|c| c == '\'' || c == '"'))
            .rfind(|word| word.contains(".tar") || word.contains(".tgz"))
            .ok_or_else(err)?,
        None => &text,
    };
    let name = url::basename(located);
    if name.is_empty() || name == "." || name == ".." {
        return Err(err());
    }
    Ok(name.to_string())
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

    /// The epoch's first read errors (see [`SkipCounter::errors`]).
    pub fn errors(&self) -> Vec<String> {
        self.skipped.errors()
    }

    pub(crate) fn counter(&self) -> SkipCounter {
        self.skipped.clone()
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
