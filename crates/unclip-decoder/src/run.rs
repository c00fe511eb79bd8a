//! A trained decoder from a `train-decoder` run directory, for inference.

use std::path::Path;

use anyhow::Result;
use tch::{nn, Device};

use crate::model::UnclipDecoder;
use crate::task::DecoderTrainConfig;

/// A run's resolved config and the weights of one of its checkpoints, frozen. The CLIP it was
/// trained with is the config's `clip:`.
pub struct DecoderRun {
    pub cfg: DecoderTrainConfig,
    pub vs: nn::VarStore,
    pub model: UnclipDecoder,
    /// The checkpoint and which weights, for messages.
    pub source: String,
}

impl DecoderRun {
    /// `run_dir/config.yaml` and `checkpoint`'s weights, or the newest complete checkpoint's (EMA
    /// weights when present).
    pub fn load(run_dir: &Path, checkpoint: Option<&Path>, device: Device) -> Result<Self> {
        let (cfg, vs, model, source) = unclip_train::checkpoint::load_frozen_run(
            run_dir,
            checkpoint,
            "train-decoder",
            device,
            |p, cfg: &DecoderTrainConfig| UnclipDecoder::from_config(p, &cfg.decoder.model),
        )?;
        Ok(Self {
            cfg,
            vs,
            model,
            source,
        })
    }

    /// The side of the images it was trained on (and samples).
    pub fn resolution(&self) -> i64 {
        i64::from(self.cfg.data.image.resolution)
    }
}
