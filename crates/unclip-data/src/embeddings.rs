//! Precomputed CLIP embeddings, stored as WebDataset shards beside the image shards: `embed` writes
//! one embedding shard per image shard, with the **same file name and the same keys**. A sample:
//!
//! - `KEY.img_emb.npy`: float32 `[embed_dim]`, L2-normalised image embedding z_i;
//! - `KEY.txt_emb.npy`: float32 `[embed_dim]`, L2-normalised text embedding z_t;
//! - `KEY.txt`: the caption;
//! - `KEY.txt_tokens.npy` (optional): float16 `[n, text_width]`, the text encoder's final features
//!   for the caption's tokens up to and including the end token (the priors' "encoded text").
//!
//! Python's webdataset decodes these with `.decode()` (numpy arrays), so they are usable there too.
//! The prior trains from these shards alone; the decoder pairs them with the image shards by key.

use std::path::Path;

use webdataset::{Sample, TarWriter, Value};

use crate::npy::NpyArray;
use crate::reader::bytes_of;
use crate::shards::ShardError;

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

/// The embedding shard that belongs to `image_shard`: same file name, in `embedding_dir`.
pub fn embedding_shard_for(
    image_shard: &Path,
    embedding_dir: &Path,
) -> Result<std::path::PathBuf, ShardError> {
    let name = image_shard
        .file_name()
        .ok_or_else(|| io_err(image_shard, "not a shard file"))?;
    Ok(embedding_dir.join(name))
}

/// Matches an image shard's keys with its embedding shard's keys. `embed` writes the embedding
/// shard in the image shard's order and only leaves out samples it could not read, so the
/// embedding keys must be a subsequence of the image keys. Returns, per image sample, the index of
/// its embedding (None: no embedding, the sample is skipped); an embedding key that does not fit
/// is an error naming it.
pub fn align_by_key(
    image_keys: &[String],
    embedding_keys: &[String],
    embedding_shard: &Path,
) -> Result<Vec<Option<usize>>, ShardError> {
    let mut out = Vec::with_capacity(image_keys.len());
    let mut next = 0;
    for key in image_keys {
        if embedding_keys.get(next) == Some(key) {
            out.push(Some(next));
            next += 1;
        } else {
            out.push(None);
        }
    }
    if let Some(stray) = embedding_keys.get(next) {
        return Err(io_err(
            embedding_shard,
            format!(
                "embedding key {stray:?} has no image with that key (in order) in the image shard; \
                 the shards do not belong together"
            ),
        ));
    }
    Ok(out)
}
