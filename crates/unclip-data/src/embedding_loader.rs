//! Batches of precomputed embeddings (the shards `embed` writes) for the priors, read ahead of the
//! trainer by a background thread. Deterministic for a seed and a rank, and exactly resumable:
//! every batch carries the stream position after it, as [`crate::loader::ImageLoader`]'s do.

use crate::embeddings::{parse_embedding_sample, EmbeddingSample};
use crate::loader::{DataPosition, EpochReport};
use crate::prefetch::Prefetch;
use crate::reader::{ReaderConfig, ShardReader};
use crate::shards::ShardError;

#[derive(Debug, Clone)]
pub struct EmbeddingLoaderConfig {
    pub reader: ReaderConfig,
    pub batch_size: usize,
    /// Batches queued ahead of the trainer.
    pub prefetch: usize,
    /// Where the stream starts (a checkpoint's position to resume).
    pub start: DataPosition,
}

#[derive(Debug, Clone)]
pub struct EmbeddingBatch {
    pub samples: Vec<EmbeddingSample>,
    /// The stream position after this batch.
    pub position: DataPosition,
    /// Epochs that ended while this batch was gathered.
    pub finished_epochs: Vec<EpochReport>,
    /// Samples skipped since the start of the stream (malformed or missing fields).
    pub skipped_total: u64,
}

pub struct EmbeddingLoader {
    batches: Prefetch<EmbeddingBatch>,
}

type SampleIter = Box<dyn Iterator<Item = EmbeddingSample> + Send>;

struct Producer {
    cfg: EmbeddingLoaderConfig,
    position: DataPosition,
    epoch: Option<(ShardReader<EmbeddingSample>, SampleIter)>,
    epoch_samples: u64,
    skipped_total: u64,
}

impl Producer {
    fn open(&mut self) -> Result<(), ShardError> {
        let reader = ShardReader::with_parser(
            &self.cfg.reader,
            self.position.epoch,
            parse_embedding_sample,
        )?;
        let mut iter: SampleIter = Box::new(reader.iter());
        // Resuming inside an epoch: the order is deterministic, so skip what was consumed.
        for _ in 0..self.position.samples {
            if iter.next().is_none() {
                break;
            }
        }
        self.epoch_samples = self.position.samples;
        self.epoch = Some((reader, iter));
        Ok(())
    }

    fn next_batch(&mut self) -> Result<EmbeddingBatch, ShardError> {
        let mut samples = Vec::with_capacity(self.cfg.batch_size);
        let mut finished = Vec::new();
        while samples.len() < self.cfg.batch_size {
            if self.epoch.is_none() {
                self.open()?;
            }
            let (reader, iter) = self.epoch.as_mut().expect("opened above");
            match iter.next() {
                Some(s) => {
                    samples.push(s);
                    self.position.samples += 1;
                    self.epoch_samples += 1;
                }
                None => {
                    let skipped = reader.skipped();
                    self.skipped_total += skipped;
                    if self.epoch_samples == 0 {
                        return Err(ShardError::Io {
                            path: self.cfg.reader.shards.clone().into(),
                            message: format!(
                                "epoch {} yielded no usable embedding samples ({skipped} skipped as malformed)",
                                self.position.epoch
                            ),
                        });
                    }
                    finished.push(EpochReport {
                        epoch: self.position.epoch,
                        samples: self.epoch_samples,
                        skipped_read: skipped,
                        skipped_decode: 0,
                        read_errors: reader.errors(),
                    });
                    self.epoch = None;
                    self.position = DataPosition {
                        epoch: self.position.epoch + 1,
                        samples: 0,
                    };
                }
            }
        }
        let open_skips = self.epoch.as_ref().map_or(0, |(r, _)| r.skipped());
        Ok(EmbeddingBatch {
            samples,
            position: self.position,
            finished_epochs: finished,
            skipped_total: self.skipped_total + open_skips,
        })
    }
}

impl crate::loader::Restartable for EmbeddingLoader {
    type Config = EmbeddingLoaderConfig;

    fn start_at(cfg: &EmbeddingLoaderConfig, start: DataPosition) -> Result<Self, ShardError> {
        Self::start(EmbeddingLoaderConfig {
            start,
            ..cfg.clone()
        })
    }
}

impl EmbeddingLoader {
    /// Checks the shard list (missing shards and impossible rank splits fail here), then starts
    /// the background thread.
    pub fn start(cfg: EmbeddingLoaderConfig) -> Result<Self, ShardError> {
        if cfg.batch_size == 0 {
            return Err(ShardError::Io {
                path: cfg.reader.shards.clone().into(),
                message: "batch_size must be at least 1".into(),
            });
        }
        ShardReader::with_parser(&cfg.reader, cfg.start.epoch, parse_embedding_sample)?;
        let depth = cfg.prefetch;
        let mut producer = Producer {
            position: cfg.start,
            cfg,
            epoch: None,
            epoch_samples: 0,
            skipped_total: 0,
        };
        Ok(Self {
            batches: Prefetch::spawn("unclip-embedding-loader", depth, move || {
                producer.next_batch()
            })?,
        })
    }

    /// The next batch (blocks until it is ready).
    pub fn next_batch(&mut self) -> Result<EmbeddingBatch, ShardError> {
        self.batches.next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embeddings::write_embedding_shard;

    fn shard(dir: &std::path::Path, name: &str, first: usize, n: usize) {
        let samples: Vec<EmbeddingSample> = (first..first + n)
            .map(|i| EmbeddingSample {
                key: format!("{i:06}"),
                caption: format!("caption {i}"),
                image_emb: vec![i as f32, 1.0],
                text_emb: vec![1.0, i as f32],
                text_tokens: None,
            })
            .collect();
        write_embedding_shard(&dir.join(name), &samples).unwrap();
    }

    fn keys(loader: &mut EmbeddingLoader, batches: usize) -> Vec<(String, DataPosition)> {
        (0..batches)
            .flat_map(|_| {
                let b = loader.next_batch().unwrap();
                let pos = b.position;
                b.samples
                    .into_iter()
                    .map(move |s| (s.key, pos))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn batches_cover_epochs_and_resume_exactly() {
        let dir = tempfile::tempdir().unwrap();
        shard(dir.path(), "e-000000.tar", 0, 7);
        shard(dir.path(), "e-000001.tar", 7, 6);
        let cfg = EmbeddingLoaderConfig {
            reader: ReaderConfig {
                shards: format!("{}/e-{{000000..000001}}.tar", dir.path().display()),
                rank: 0,
                world_size: 1,
                seed: 3,
                shard_shuffle: true,
                shuffle_buffer: 4,
            },
            batch_size: 5,
            prefetch: 2,
            start: DataPosition::default(),
        };
        let mut loader = EmbeddingLoader::start(cfg.clone()).unwrap();
        let all = keys(&mut loader, 6); // 30 samples: two full epochs of 13 and 4 more
        let mut epoch0: Vec<&str> = all[..13].iter().map(|(k, _)| k.as_str()).collect();
        epoch0.sort();
        assert_eq!(epoch0.len(), 13);
        epoch0.dedup();
        assert_eq!(epoch0.len(), 13, "each sample once per epoch");
        assert_ne!(
            all[..13].iter().map(|x| &x.0).collect::<Vec<_>>(),
            all[13..26].iter().map(|x| &x.0).collect::<Vec<_>>(),
            "epochs are reshuffled"
        );
        // Resume from the position after the second batch.
        let start = all[9].1;
        let mut resumed = EmbeddingLoader::start(EmbeddingLoaderConfig { start, ..cfg }).unwrap();
        let rest = keys(&mut resumed, 4);
        assert_eq!(
            rest.iter().map(|x| &x.0).collect::<Vec<_>>(),
            all[10..30].iter().map(|x| &x.0).collect::<Vec<_>>()
        );
    }

    #[test]
    fn malformed_samples_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        shard(dir.path(), "e-000000.tar", 0, 3);
        // A sample whose embeddings are not .npy arrays.
        let mut w =
            webdataset::TarWriter::create(dir.path().join("e-000001.tar").to_str().unwrap())
                .unwrap();
        let mut s = webdataset::Sample::with_key("bad".to_string());
        s.insert(
            "img_emb.npy",
            webdataset::Value::Bytes(b"junk".to_vec().into()),
        );
        s.insert(
            "txt_emb.npy",
            webdataset::Value::Bytes(b"junk".to_vec().into()),
        );
        s.insert("txt", webdataset::Value::Bytes(b"x".to_vec().into()));
        w.write(&s).unwrap();
        w.close().unwrap();
        let mut loader = EmbeddingLoader::start(EmbeddingLoaderConfig {
            reader: ReaderConfig::in_order(format!(
                "{}/e-{{000000..000001}}.tar",
                dir.path().display()
            )),
            batch_size: 4,
            prefetch: 1,
            start: DataPosition::default(),
        })
        .unwrap();
        let b = loader.next_batch().unwrap();
        assert_eq!(b.samples.len(), 4);
        assert_eq!(b.finished_epochs.len(), 1);
        assert_eq!(b.finished_epochs[0].samples, 3);
        assert_eq!(b.finished_epochs[0].skipped_read, 1);
        assert_eq!(b.skipped_total, 1);
    }
}
