//! Checkpoints: `<run>/checkpoints/step-000001000/` holding `model.safetensors`,
//! `ema.safetensors`, `optimizer.safetensors` (module-path names) and `meta.json` (step, counters,
//! data position, the resolved config). A checkpoint is written into a hidden temporary directory,
//! fsynced and renamed into place, so a crash never leaves a half-written `step-*`; resume takes
//! the newest complete one. What to keep is [`RetentionPolicy`]'s business.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

const FORMAT_VERSION: u32 = 1;

/// Everything but the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub step: u64,
    pub ema_updates: u64,
    pub nonfinite_skipped: u64,
    pub seed: u64,
    /// Updates the optimiser has applied: fewer than `step` when steps were skipped (fp16
    /// overflows, non-finite losses); AdamW's bias correction counts these. Absent in older
    /// checkpoints, which had `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_steps: Option<u64>,
    /// How many processes trained the run (absent in older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
    /// The fp16 loss scaler's state (absent for other precisions and older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::loss_scale::LossScaleState>,
    /// Where the data stream stands (the task's own format).
    pub data_state: serde_json::Value,
    /// The resolved run config.
    pub config: serde_json::Value,
}

impl CheckpointMeta {
    pub fn new(step: u64) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step,
            ema_updates: 0,
            nonfinite_skipped: 0,
            seed: 0,
            optimizer_steps: None,
            world_size: None,
            loss_scale: None,
            data_state: serde_json::Value::Null,
            config: serde_json::Value::Null,
        }
    }
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub meta: CheckpointMeta,
    pub model: HashMap<String, Tensor>,
    pub ema: Option<HashMap<String, Tensor>>,
    pub optimizer: HashMap<String, Tensor>,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:09}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    // Synced with the rest of the checkpoint by `publish::write_dir`.
    Tensor::write_safetensors(&cpu, path).with_context(|| format!("writing {}", path.display()))
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .collect())
}

/// Writes a checkpoint atomically under `root` and returns its directory.
pub fn save(
    root: &Path,
    meta: &CheckpointMeta,
    model: &[(String, Tensor)],
    ema: Option<&[(String, Tensor)]>,
    optimizer: &[(String, Tensor)],
) -> Result<PathBuf> {
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let dst = root.join(step_dir_name(meta.step));
    crate::publish::write_dir(&dst, |tmp| {
        write_tensors(&tmp.join("model.safetensors"), model)?;
        if let Some(ema) = ema {
            write_tensors(&tmp.join("ema.safetensors"), ema)?;
        }
        write_tensors(&tmp.join("optimizer.safetensors"), optimizer)?;
        let meta_path = tmp.join("meta.json");
        fs::write(&meta_path, serde_json::to_vec_pretty(meta)?)
            .with_context(|| format!("writing {}", meta_path.display()))
    })?;
    Ok(dst)
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = parse_step(&name) {
            if entry.path().join("meta.json").is_file()
                && entry.path().join("model.safetensors").is_file()
            {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}

pub fn load(dir: &Path) -> Result<Checkpoint> {
    let meta_path = dir.join("meta.json");
    let meta: CheckpointMeta = serde_json::from_slice(
        &fs::read(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?,
    )
    .with_context(|| format!("parsing {}", meta_path.display()))?;
    if meta.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} (this build reads {FORMAT_VERSION})",
            dir.display(),
            meta.format_version
        );
    }
    let ema_path = dir.join("ema.safetensors");
    Ok(Checkpoint {
        meta,
        model: read_tensors(&dir.join("model.safetensors"))?,
        ema: if ema_path.exists() {
            Some(read_tensors(&ema_path)?)
        } else {
            None
        },
        optimizer: read_tensors(&dir.join("optimizer.safetensors"))?,
        dir: dir.to_path_buf(),
    })
}

/// The weights a trained run is used with: its newest complete checkpoint's EMA weights when it
/// has them, else its model weights; with a description ("DIR (EMA weights)") for messages.
pub fn inference_weights(run_dir: &Path) -> Result<(HashMap<String, Tensor>, String)> {
    let dir = latest(&checkpoints_dir(run_dir))?
        .with_context(|| format!("{}: no complete checkpoint", run_dir.display()))?;
    checkpoint_weights(&dir)
}

/// A trained run for inference: the task sections of its resolved `RUN/config.yaml` and the
/// weights of `checkpoint` (a `RUN/checkpoints/step-N` directory) or, without one, of its newest
/// ([`inference_weights`]), with their description. `trainer` names the binary for the error when
/// `run_dir` is not a run directory.
pub fn load_run<T: serde::de::DeserializeOwned + crate::config::Validate>(
    run_dir: &Path,
    checkpoint: Option<&Path>,
    trainer: &str,
) -> Result<(T, HashMap<String, Tensor>, String)> {
    let config = run_dir.join("config.yaml");
    anyhow::ensure!(
        config.is_file(),
        "{}: not a {trainer} run directory (no config.yaml)",
        run_dir.display()
    );
    let task = crate::config::load_config::<T>(&config, &[])?.task;
    let (weights, source) = run_weights(run_dir, checkpoint)?;
    Ok((task, weights, source))
}

/// [`load_run`], then the model `build` makes from the config on a fresh `VarStore` on `device`,
/// with the weights loaded and frozen: (config, store, model, the weights' description).
pub fn load_frozen_run<T, M>(
    run_dir: &Path,
    checkpoint: Option<&Path>,
    trainer: &str,
    device: tch::Device,
    build: impl FnOnce(tch::nn::Path, &T) -> Result<M>,
) -> Result<(T, tch::nn::VarStore, M, String)>
where
    T: serde::de::DeserializeOwned + crate::config::Validate,
{
    let (cfg, weights, source) = load_run::<T>(run_dir, checkpoint, trainer)?;
    let mut vs = tch::nn::VarStore::new(device);
    let model = build(vs.root(), &cfg)?;
    crate::trainer::load_into(&vs, &weights, &source)?;
    vs.freeze();
    Ok((cfg, vs, model, source))
}

/// The weights of `checkpoint` when given, else [`inference_weights`] of `run_dir`.
pub fn run_weights(
    run_dir: &Path,
    checkpoint: Option<&Path>,
) -> Result<(HashMap<String, Tensor>, String)> {
    match checkpoint {
        Some(dir) => checkpoint_weights(dir),
        None => inference_weights(run_dir),
    }
}

/// [`inference_weights`] of one checkpoint directory (`RUN/checkpoints/step-NNNNNNNNN`).
pub fn checkpoint_weights(dir: &Path) -> Result<(HashMap<String, Tensor>, String)> {
    let ck = load(dir)?;
    Ok(match ck.ema {
        Some(ema) => (ema, format!("{} (EMA weights)", dir.display())),
        None => (ck.model, format!("{} (model weights)", dir.display())),
    })
}

/// Which checkpoints to keep: the `keep_last` newest plus every multiple of `milestone_every`.
#[derive(Debug, Clone, Copy)]
pub struct RetentionPolicy {
    pub keep_last: usize,
    pub milestone_every: Option<u64>,
}

impl RetentionPolicy {
    /// Deletes the complete checkpoints the policy does not keep.
    pub fn prune(&self, root: &Path) -> Result<Vec<PathBuf>> {
        let all = list(root)?;
        let cut = all.len().saturating_sub(self.keep_last);
        let mut removed = Vec::new();
        for (step, path) in &all[..cut] {
            if self.milestone_every.is_some_and(|m| step % m == 0) {
                continue;
            }
            fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(path.clone());
        }
        Ok(removed)
    }
}
