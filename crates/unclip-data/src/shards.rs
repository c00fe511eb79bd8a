//! Writing the shapes dataset as WebDataset tar shards (`KEY.png`, `KEY.txt`, `KEY.json`), one
//! shard per task in parallel, each written to a temporary name and renamed when complete.

use crate::shapes::make_sample;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use webdataset::{Sample, TarWriter, Value};

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("resolution {0} is outside 32..=1024")]
    Resolution(u32),
    #[error("shard size must be at least 1")]
    ShardSize,
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("checkpoint data_state is not a data position: {0}")]
    DataState(String),
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct ShapesSpec {
    pub count: u64,
    pub resolution: u32,
    pub seed: u64,
    pub shard_size: u64,
    /// Shards are `<out>/<prefix>-000000.tar`, …
    pub out: PathBuf,
    pub prefix: String,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ShardError {
    ShardError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes every shard; returns their paths in order.
pub fn write_shapes_shards(spec: &ShapesSpec) -> Result<Vec<PathBuf>, ShardError> {
    if !(32..=1024).contains(&spec.resolution) {
        return Err(ShardError::Resolution(spec.resolution));
    }
    if spec.shard_size == 0 {
        return Err(ShardError::ShardSize);
    }
    std::fs::create_dir_all(&spec.out).map_err(|e| io_err(&spec.out, e))?;
    let shards = spec.count.div_ceil(spec.shard_size);
    (0..shards)
        .into_par_iter()
        .map(|shard| {
            let path = spec.out.join(format!("{}-{shard:06}.tar", spec.prefix));
            let tmp = spec
                .out
                .join(format!(".{}-{shard:06}.tar.partial", spec.prefix));
            let tmp_str = tmp
                .to_str()
                .ok_or_else(|| io_err(&tmp, "path is not UTF-8"))?;
            // A fixed mtime makes shards byte-for-byte reproducible.
            let mut writer = TarWriter::create(tmp_str)
                .map_err(|e| io_err(&tmp, e))?
                .with_mtime(Some(0));
            let first = shard * spec.shard_size;
            for index in first..(first + spec.shard_size).min(spec.count) {
                let s =
                    make_sample(spec.seed, index, spec.resolution).map_err(|e| io_err(&path, e))?;
                let json = serde_json::to_vec(&s.scene).map_err(|e| io_err(&path, e))?;
                let mut sample = Sample::with_key(s.key);
                sample.insert("png", Value::Bytes(s.png.into()));
                sample.insert("txt", Value::Text(s.caption));
                sample.insert("json", Value::Bytes(json.into()));
                writer.write(&sample).map_err(|e| io_err(&tmp, e))?;
            }
            writer.close().map_err(|e| io_err(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
            Ok(path)
        })
        .collect()
}
