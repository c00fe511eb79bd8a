//! Precomputed CLIP embeddings, stored as WebDataset shards beside the image shards: `embed` writes
//! one embedding shard per image shard, with the **same file name and the same keys**. A sample:
//!
//! - `KEY.img_emb.npy`: float32 `[embed_dim]`, the image embedding z_i;
//! - `KEY.txt_emb.npy`: float32 `[embed_dim]`, the text embedding z_t — both L2-normalised, or
//!   both as the CLIP's projections give them (`embed --raw`; see [`ClipEmbeddings`]);
//! - `KEY.txt`: the caption;
//! - `KEY.txt_tokens.npy` (optional): float16 `[n, text_width]`, the text encoder's final features
//!   for the caption's tokens up to and including the end token (the priors' "encoded text").
//!
//! Python's webdataset decodes these with `.decode()` (numpy arrays), so they are usable there too.
//! The prior trains from these shards alone; the decoder pairs them with the image shards by key.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use webdataset::{Sample, TarWriter, Value};

use crate::npy::NpyArray;
use crate::reader::{
    bytes_of, is_streamed, rank_shards, shard_list, shard_name, CaptionedImage, ReaderConfig,
    ShardReader, SkipCounter,
};
use crate::shards::ShardError;

/// How z_i and z_t are scaled, in the shards and wherever a prior or decoder consumes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipEmbeddings {
    /// L2-normalised (DALLE2-pytorch's convention; this framework's default).
    #[default]
    Normalized,
    /// As the CLIP's projections give them (diffusers' UnCLIP pipeline and Karlo's).
    Raw,
}

/// How far from 1 a normalised embedding's norm may be (float32 rounding, fp16 CLIPs).
const UNIT_NORM_TOLERANCE: f64 = 2e-3;

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

impl ClipEmbeddings {
    /// The value as configs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Normalized => "normalized",
            Self::Raw => "raw",
        }
    }

    /// Checks that `samples`' stored z_i and z_t follow this convention; the error names the
    /// sample, its norm and `key`, the config key that chose the convention. Normalised: every
    /// norm is 1. Raw: not all of them are (one raw embedding may happen to be near 1).
    pub fn check(self, samples: &[EmbeddingSample], key: &str) -> Result<(), String> {
        let unit = |v: &[f32]| (norm(v) - 1.0).abs() <= UNIT_NORM_TOLERANCE;
        match self {
            Self::Normalized => {
                for s in samples {
                    for (what, v) in [("image", &s.image_emb), ("text", &s.text_emb)] {
                        if !unit(v) {
                            return Err(format!(
                                "sample {}: its {what} embedding has norm {:.4}, not 1: these embeddings are \
                                 not L2-normalised (written by `embed --raw`?); set {key}: raw \
                                 to train on them as they are",
                                s.key,
                                norm(v)
                            ));
                        }
                    }
                }
                Ok(())
            }
            Self::Raw => {
                if !samples.is_empty()
                    && samples
                        .iter()
                        .all(|s| unit(&s.image_emb) && unit(&s.text_emb))
                {
                    return Err(format!(
                        "every embedding of {} samples (from {}) has norm 1: these are L2-normalised \
                         embeddings, and {key} is raw; write raw ones with `embed --raw` or set \
                         {key}: normalized",
                        samples.len(),
                        samples[0].key
                    ));
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingSample {
    pub key: String,
    pub caption: String,
    pub image_emb: Vec<f32>,
    pub text_emb: Vec<f32>,
    pub text_tokens: Option<NpyArray>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ShardError {
    ShardError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes `samples` as one shard at `path`, atomically: a reader never sees a partial shard, and
/// an interrupted `embed` leaves no file under the final name.
pub fn write_embedding_shard(path: &Path, samples: &[EmbeddingSample]) -> Result<(), ShardError> {
    let tmp = path.with_extension("tar.partial");
    let tmp_str = tmp.to_str().ok_or_else(|| io_err(&tmp, "non-UTF-8 path"))?;
    let mut w = TarWriter::create(tmp_str).map_err(|e| io_err(&tmp, e))?;
    for s in samples {
        let mut sample = Sample::with_key(s.key.clone());
        let vec = |v: &[f32]| NpyArray::f32(vec![v.len()], v.to_vec()).to_bytes();
        sample.insert("img_emb.npy", Value::Bytes(vec(&s.image_emb).into()));
        sample.insert("txt_emb.npy", Value::Bytes(vec(&s.text_emb).into()));
        sample.insert("txt", Value::Bytes(s.caption.clone().into_bytes().into()));
        if let Some(tokens) = &s.text_tokens {
            sample.insert("txt_tokens.npy", Value::Bytes(tokens.to_bytes().into()));
        }
        w.write(&sample).map_err(|e| io_err(&tmp, e))?;
    }
    w.close().map_err(|e| io_err(&tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn npy(s: &Sample, field: &str) -> Option<NpyArray> {
    NpyArray::from_bytes(&s.get(field).and_then(bytes_of)?).ok()
}

/// One embedding sample, or None (skipped and counted) when a field is missing or malformed.
pub fn parse_embedding_sample(s: &Sample) -> Option<EmbeddingSample> {
    let image_emb = npy(s, "img_emb.npy")?;
    let text_emb = npy(s, "txt_emb.npy")?;
    if image_emb.shape.len() != 1 || image_emb.shape != text_emb.shape {
        return None;
    }
    Some(EmbeddingSample {
        key: s.key()?.to_string(),
        caption: String::from_utf8(s.get("txt").and_then(bytes_of)?).ok()?,
        image_emb: image_emb.to_f32(),
        text_emb: text_emb.to_f32(),
        text_tokens: match s.get("txt_tokens.npy") {
            Some(_) => Some(npy(s, "txt_tokens.npy").filter(|t| t.shape.len() == 2)?),
            None => None,
        },
    })
}

/// Where the embedding shard of `image_shard` is: the image shard's file name ([`shard_name`])
/// in `embedding_dir` — a local directory, a URL prefix (`https://host/emb`, `gs://bucket/emb`)
/// or, where the name must go inside a command, a template whose `{}` it replaces
/// (`pipe:aws s3 cp s3://bucket/emb/{} -`).
pub fn embedding_shard_for(
    image_shard: &Path,
    embedding_dir: &Path,
) -> Result<std::path::PathBuf, ShardError> {
    let name = shard_name(image_shard)?;
    let dir = embedding_dir.to_string_lossy();
    Ok(if dir.contains("{}") {
        PathBuf::from(dir.replace("{}", &name))
    } else if is_streamed(&dir) {
        PathBuf::from(format!("{}/{name}", dir.trim_end_matches('/')))
    } else {
        PathBuf::from(webdataset::io::url::to_local_path(&dir)).join(name)
    })
}

/// Matches an image shard's keys with its embedding shard's keys. `embed` writes the embedding
/// shard in the image shard's order and only leaves out samples it could not read, so the
/// embedding keys must be a subsequence of the image keys. Returns, per image sample, the index of
/// its embedding (None: no embedding, the sample is skipped). An embedding out of order is an
/// error naming its key, and so is one whose image is not there — unless `images_incomplete`
/// (the image shard had unreadable samples this time, e.g. a stream cut short), which explains
/// it: the embedding is then passed over.
pub fn align_by_key(
    image_keys: &[String],
    embedding_keys: &[String],
    embedding_shard: &Path,
    images_incomplete: bool,
) -> Result<Vec<Option<usize>>, ShardError> {
    let index: std::collections::HashMap<&str, usize> = embedding_keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let stray = |key: &str| {
        io_err(
            embedding_shard,
            format!(
                "embedding key {key:?} has no image with that key (in order) in the image shard; \
                 the shards do not belong together"
            ),
        )
    };
    let mut out = Vec::with_capacity(image_keys.len());
    let mut next = 0;
    for key in image_keys {
        match index.get(key.as_str()) {
            Some(&i) if i >= next => {
                if i > next && !images_incomplete {
                    return Err(stray(&embedding_keys[next]));
                }
                out.push(Some(i));
                next = i + 1;
            }
            Some(_) => return Err(stray(key)),
            None => out.push(None),
        }
    }
    match embedding_keys.get(next) {
        Some(key) if !images_incomplete => Err(stray(key)),
        _ => Ok(out),
    }
}

/// An image sample with its precomputed embeddings.
pub type Paired = (CaptionedImage, EmbeddingSample);

/// Image shards read together with their embedding shards (same file names in `embedding_dir`),
/// matched by key with [`align_by_key`]. Shard order and a sample buffer are shuffled from (seed,
/// epoch, rank) like [`ShardReader`]; image samples without an embedding are skipped and counted;
/// an embedding shard that does not belong to its image shard is an error naming the key.
pub struct PairedShardReader {
    shards: Vec<PathBuf>,
    embedding_dir: PathBuf,
    shuffle_buffer: usize,
    seed: u64,
    skipped: SkipCounter,
}

fn single(path: &Path) -> ReaderConfig {
    ReaderConfig::in_order(path.display().to_string())
}

/// One image shard and its embedding shard, matched.
fn read_pair(
    image_shard: &Path,
    embedding_dir: &Path,
    skipped: &SkipCounter,
) -> Result<Vec<Paired>, ShardError> {
    let emb_path = embedding_shard_for(image_shard, embedding_dir)?;
    let image_reader = ShardReader::new(&single(image_shard), 0)?;
    let embedding_reader = ShardReader::with_parser(&single(&emb_path), 0, parse_embedding_sample)?;
    let images: Vec<CaptionedImage> = image_reader.iter().collect();
    let embs: Vec<EmbeddingSample> = embedding_reader.iter().collect();
    // The images' unreadable samples count as skipped (the embeddings' show up as images without
    // one); both readers' error messages are kept. Read errors in the image shard explain
    // embeddings whose image is gone.
    skipped.absorb(&image_reader.counter(), true);
    skipped.absorb(&embedding_reader.counter(), false);
    let image_keys: Vec<String> = images.iter().map(|s| s.key.clone()).collect();
    let emb_keys: Vec<String> = embs.iter().map(|s| s.key.clone()).collect();
    let matches = align_by_key(
        &image_keys,
        &emb_keys,
        &emb_path,
        !image_reader.errors().is_empty(),
    )?;
    let mut embs: Vec<Option<EmbeddingSample>> = embs.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(images.len());
    for (img, m) in images.into_iter().zip(matches) {
        match m.and_then(|i| embs[i].take()) {
            Some(e) => out.push((img, e)),
            None => skipped.bump(),
        }
    }
    Ok(out)
}

impl PairedShardReader {
    /// Checks, before any training, that every local embedding shard exists and that the first
    /// pair of shards can be read and belongs together.
    pub fn new(cfg: &ReaderConfig, embedding_dir: &Path, epoch: u64) -> Result<Self, ShardError> {
        Self::open(cfg, embedding_dir, epoch, true)
    }

    /// As [`PairedShardReader::new`], reading the first pair ahead only when `check_first_pair`:
    /// the loader checks it once at the start, not at every epoch (a streamed shard would be
    /// fetched twice, and a passing network error would end the run instead of being skipped).
    pub(crate) fn open(
        cfg: &ReaderConfig,
        embedding_dir: &Path,
        epoch: u64,
        check_first_pair: bool,
    ) -> Result<Self, ShardError> {
        let mut shards = rank_shards(&shard_list(&cfg.shards)?, cfg.rank, cfg.world_size)?;
        for s in &shards {
            let e = embedding_shard_for(s, embedding_dir)?;
            // A streamed one is checked by reading the first pair below.
            if !is_streamed(&e.to_string_lossy()) && !e.is_file() {
                return Err(io_err(
                    &e,
                    format!("embedding shard for {} not found", s.display()),
                ));
            }
        }
        let seed = cfg.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (cfg.rank as u64) << 32;
        if cfg.shard_shuffle {
            shards.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        }
        let first = SkipCounter::default();
        if check_first_pair
            && read_pair(&shards[0], embedding_dir, &first)?.is_empty()
            && !first.errors().is_empty()
        {
            return Err(io_err(
                &shards[0],
                format!(
                    "no sample of the first shard pair could be read: {}",
                    first.errors().join(" | ")
                ),
            ));
        }
        Ok(Self {
            shards,
            embedding_dir: embedding_dir.to_path_buf(),
            shuffle_buffer: cfg.shuffle_buffer,
            seed,
            skipped: SkipCounter::default(),
        })
    }

    /// The epoch's pairs; an error ends the iteration.
    pub fn iter(&self) -> impl Iterator<Item = Result<Paired, ShardError>> + Send + 'static {
        let shards = self.shards.clone();
        let dir = self.embedding_dir.clone();
        let skipped = self.skipped.clone();
        let pairs = shards
            .into_iter()
            .flat_map(move |s| match read_pair(&s, &dir, &skipped) {
                Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            });
        BufferShuffle::new(pairs, self.shuffle_buffer, self.seed)
    }

    pub fn skipped(&self) -> u64 {
        self.skipped.get()
    }

    /// What the epoch skipped and the first read errors, of image and embedding shards alike.
    pub(crate) fn counter(&self) -> SkipCounter {
        self.skipped.clone()
    }
}

/// A seeded shuffle buffer: hold up to `size` items, emit a random one as each new item arrives.
struct BufferShuffle<I: Iterator> {
    inner: I,
    buffer: Vec<I::Item>,
    size: usize,
    rng: ChaCha8Rng,
}

impl<I: Iterator> BufferShuffle<I> {
    fn new(inner: I, size: usize, seed: u64) -> Self {
        Self {
            inner,
            buffer: Vec::with_capacity(size),
            size,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xB5F1),
        }
    }
}

impl<I: Iterator> Iterator for BufferShuffle<I> {
    type Item = I::Item;
    fn next(&mut self) -> Option<I::Item> {
        while self.buffer.len() < self.size.max(1) {
            match self.inner.next() {
                Some(item) => self.buffer.push(item),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.buffer.len());
        Some(self.buffer.swap_remove(i))
    }
}
