//! Run configs: one YAML file, `--set key.path=value` overrides, typed sections with unknown keys,
//! wrong types and out-of-range values reported by key path and file before any work starts.
//! The runtime owns `seed`, `device`, `train`, `logging` and `checkpoint`; every other top-level
//! key belongs to the task's own config type (`model`, `diffusion`, `data`, …).

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use std::path::Path;

/// Keys the runtime reads; the rest of the file goes to the task.
pub const RUNTIME_KEYS: [&str; 6] = [
    "seed",
    "device",
    "train",
    "logging",
    "checkpoint",
    "distributed",
];

/// Learning-rate shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Cosine,
}

/// `train:` — optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimiser steps in all.
    pub steps: u64,
    /// Samples per micro-batch (per process).
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled (AdamW) weight decay; never applied to biases, norms or embeddings.
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub lr_schedule: LrSchedule,
    /// Cosine decay ends at lr · min_lr_ratio.
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this value (none: no clipping).
    pub grad_clip: Option<f64>,
    /// EMA decay of the weights (none: no EMA).
    pub ema_decay: Option<f64>,
    /// Ramp the EMA decay as min(decay, (1 + n)/(10 + n)) so early averages are not stuck at init.
    pub ema_warmup: bool,
    /// Stop after this many consecutive steps with a non-finite loss or gradient.
    pub max_nonfinite_steps: u32,
    /// Sharpness-aware minimisation with this ρ (none: plain steps). Doubles the compute.
    pub sam_rho: Option<f64>,
    /// `fp32`, or `bf16` / `fp16` autocast for the forward pass with fp32 master weights; `auto`
    /// is bf16 on CUDA and on CPUs with AMX, fp32 elsewhere.
    pub precision: crate::precision::Precision,
    /// Dynamic loss scaling for `precision: fp16`.
    pub loss_scale: crate::loss_scale::LossScaleConfig,
    /// Allow TF32 in CUDA matmuls and convolutions.
    pub tf32: bool,
    /// Store convolution weights channels-last (NHWC): faster convolutions on CUDA, especially
    /// in bf16 / fp16; slower on CPU.
    pub channels_last: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 32,
            grad_accum: 1,
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Constant,
            min_lr_ratio: 0.0,
            grad_clip: Some(1.0),
            ema_decay: Some(0.9999),
            ema_warmup: true,
            max_nonfinite_steps: 10,
            sam_rho: None,
            precision: crate::precision::Precision::Fp32,
            loss_scale: crate::loss_scale::LossScaleConfig::default(),
            tf32: true,
            channels_last: false,
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressStyle {
    /// A bar on a terminal, plain lines otherwise.
    Auto,
    Bar,
    Lines,
    Off,
}

/// `logging:` — TensorBoard and console.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Scalars are averaged over and written every this many steps.
    pub every: u64,
    pub tensorboard: bool,
    /// Also append every logged scalar to `<run>/metrics.jsonl`, a JSON object per line.
    pub jsonl: bool,
    pub progress: ProgressStyle,
    /// Log the task's sample images every this many steps (none: never).
    pub images_every: Option<u64>,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            every: 10,
            tensorboard: true,
            jsonl: true,
            progress: ProgressStyle::Auto,
            images_every: None,
        }
    }
}

/// `checkpoint:` — when to save and what to keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every this many steps (and at the end).
    pub every: u64,
    /// Keep this many most recent checkpoints…
    pub keep_last: usize,
    /// …plus every checkpoint whose step is a multiple of this (none: no milestones).
    pub milestone_every: Option<u64>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 1000,
            keep_last: 3,
            milestone_every: None,
        }
    }
}

/// What gradients are averaged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceDtype {
    Fp32,
    Bf16,
}

/// When a step's gradient buckets are all-reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradReduce {
    /// Each bucket as soon as its gradients are in, overlapping the rest of backward (as DDP).
    DuringBackward,
    /// All after backward, one bucket at a time.
    AfterBackward,
}

/// `distributed:` — data-parallel training (active when launched with RANK / WORLD_SIZE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// Bounds the rendezvous and every collective: a dead rank becomes an error, not a hang.
    pub timeout_secs: u64,
    /// Gradients are all-reduced in buckets of at most this many MiB.
    pub bucket_mb: f64,
    /// When gradient buckets are averaged: during backward, each as soon as its gradients are in
    /// (as PyTorch's DDP), or all after backward.
    pub grad_reduce: GradReduce,
    /// The type gradients travel in when averaged: `fp32`, or `bf16` (half the bytes, as
    /// PyTorch's `bf16_compress_hook`: each rank's gradients rounded to bfloat16, averaged, and
    /// widened back).
    pub reduce_dtype: ReduceDtype,
    /// ZeRO stage 1: each rank keeps the AdamW moments and EMA weights of only its share of the
    /// parameters (about 1/WORLD_SIZE of them) and updates those; the same updates as without.
    pub shard_optimizer: bool,
    /// ZeRO stage 2 (with `shard_optimizer`): each gradient is reduced to the rank that owns the
    /// variable rather than to every rank, after every micro-batch, and the others drop it once
    /// it is sent, so each rank holds about 1/WORLD_SIZE of the gradients; the same updates as
    /// without (over several micro-batches summed in another order: to rounding).
    pub shard_gradients: bool,
}

impl DistributedConfig {
    /// `bucket_mb` in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * 1024.0 * 1024.0) as usize
    }
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            timeout_secs: 600,
            bucket_mb: unclip_dist::DEFAULT_BUCKET_BYTES as f64 / (1 << 20) as f64,
            grad_reduce: GradReduce::DuringBackward,
            reduce_dtype: ReduceDtype::Fp32,
            shard_optimizer: false,
            shard_gradients: false,
        }
    }
}

/// The sections the runtime owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub seed: u64,
    /// `auto | cpu | cuda | cuda:N`
    pub device: String,
    pub train: TrainConfig,
    pub logging: LoggingConfig,
    pub checkpoint: CheckpointConfig,
    pub distributed: DistributedConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            device: "auto".into(),
            train: TrainConfig::default(),
            logging: LoggingConfig::default(),
            checkpoint: CheckpointConfig::default(),
            distributed: DistributedConfig::default(),
        }
    }
}

impl RuntimeConfig {
    /// Range checks; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let positive = [
            ("train.steps", t.steps as f64),
            ("train.batch_size", t.batch_size as f64),
            ("train.grad_accum", t.grad_accum as f64),
            ("train.lr", t.lr),
            ("train.eps", t.eps),
            ("logging.every", self.logging.every as f64),
            ("checkpoint.every", self.checkpoint.every as f64),
            ("checkpoint.keep_last", self.checkpoint.keep_last as f64),
            ("train.max_nonfinite_steps", t.max_nonfinite_steps as f64),
            (
                "distributed.timeout_secs",
                self.distributed.timeout_secs as f64,
            ),
            ("distributed.bucket_mb", self.distributed.bucket_mb),
        ];
        for (key, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                bail!("{key} must be > 0, got {v}");
            }
        }
        for (key, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("{key} must be in [0, 1), got {v}");
            }
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            bail!("train.weight_decay must be >= 0, got {}", t.weight_decay);
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            bail!(
                "train.min_lr_ratio must be in [0, 1], got {}",
                t.min_lr_ratio
            );
        }
        if let Some(c) = t.grad_clip {
            if !(c > 0.0 && c.is_finite()) {
                bail!("train.grad_clip must be > 0, got {c}");
            }
        }
        if let Some(r) = t.sam_rho {
            if !(r > 0.0 && r.is_finite()) {
                bail!("train.sam_rho must be > 0, got {r}");
            }
        }
        if let Some(d) = t.ema_decay {
            if !(0.0..1.0).contains(&d) {
                bail!("train.ema_decay must be in [0, 1), got {d}");
            }
        }
        t.loss_scale.validate().map_err(|e| anyhow!(e))?;
        if self.logging.images_every == Some(0) {
            bail!("logging.images_every must be > 0");
        }
        if self.checkpoint.milestone_every == Some(0) {
            bail!("checkpoint.milestone_every must be > 0");
        }
        if self.distributed.shard_gradients && !self.distributed.shard_optimizer {
            bail!(
                "distributed.shard_gradients: true needs distributed.shard_optimizer: true (ZeRO-2 \
                 reduces each gradient to the rank that keeps the variable's optimiser state)"
            );
        }
        crate::distributed::process_device(&self.device)?;
        Ok(())
    }

    /// This process's device (`device:`; in a multi-process CUDA job the GPU of its LOCAL_RANK).
    pub fn device(&self) -> Result<tch::Device> {
        crate::distributed::process_device(&self.device)
    }
}

/// A task's own sections check themselves the same way.
pub trait Validate {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// `{section}.init_from`'s check: the model `read` finds in `dir` must be the config's
/// `{section}.model`, else the error prints the one that would fit (as JSON, which is YAML).
pub fn check_init_from<T: PartialEq + Serialize>(
    section: &str,
    dir: &Path,
    read: impl FnOnce(&Path) -> Result<T>,
    model: &T,
) -> Result<()> {
    let theirs = read(dir).with_context(|| format!("{section}.init_from {}", dir.display()))?;
    if &theirs != model {
        bail!(
            "{section}.init_from {}: its {section} differs from {section}.model, which would be (YAML): {}",
            dir.display(),
            serde_json::to_string(&theirs).unwrap_or_default()
        );
    }
    Ok(())
}

/// A whole run config: the runtime's sections and the task's.
#[derive(Debug, Clone)]
pub struct RunConfig<T> {
    pub runtime: RuntimeConfig,
    pub task: T,
    /// The resolved YAML (file + overrides), written into the run directory.
    pub resolved: Value,
}

/// Reads `path`, applies `--set` overrides (`a.b.c=value`, the value parsed as YAML) and builds
/// the typed config. Every error names the file and the key.
pub fn load_config<T: DeserializeOwned + Validate>(
    path: &Path,
    overrides: &[String],
) -> Result<RunConfig<T>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    parse_config(&text, overrides).with_context(|| format!("config {}", path.display()))
}

/// [`load_config`] on text.
pub fn parse_config<T: DeserializeOwned + Validate>(
    text: &str,
    overrides: &[String],
) -> Result<RunConfig<T>> {
    let mut root: Value = serde_yaml::from_str(text)?;
    if root.is_null() {
        root = Value::Mapping(Mapping::new());
    }
    if !root.is_mapping() {
        bail!("the top level must be a mapping of sections");
    }
    for o in overrides {
        apply_override(&mut root, o)?;
    }
    let Value::Mapping(map) = &root else {
        unreachable!("checked above")
    };
    let mut runtime_map = Mapping::new();
    let mut task_map = Mapping::new();
    for (k, v) in map {
        let is_runtime = k.as_str().is_some_and(|k| RUNTIME_KEYS.contains(&k));
        if is_runtime {
            &mut runtime_map
        } else {
            &mut task_map
        }
        .insert(k.clone(), v.clone());
    }
    let runtime: RuntimeConfig = typed(Value::Mapping(runtime_map))?;
    runtime.validate()?;
    let task: T = typed(Value::Mapping(task_map))?;
    task.validate()?;
    Ok(RunConfig {
        runtime,
        task,
        resolved: root,
    })
}

/// Deserialises with the failing key path in the error.
fn typed<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            anyhow!("{inner}")
        } else {
            anyhow!("{path}: {inner}")
        }
    })
}

/// `base` with the keys of the YAML mapping `yaml` replaced (e.g. a sampler's `{steps: "50"}`
/// keeps its other keys); errors name `option`.
pub fn with_keys<T: serde::Serialize + DeserializeOwned>(
    option: &str,
    base: &T,
    yaml: &str,
) -> Result<T> {
    let bad = |e: &dyn std::fmt::Display| anyhow!("{option} {yaml:?}: {e}");
    let Value::Mapping(mut merged) = serde_yaml::to_value(base)? else {
        return Err(bad(&"the settings did not serialise to a mapping"));
    };
    match serde_yaml::from_str::<Value>(yaml).map_err(|e| bad(&e))? {
        Value::Mapping(keys) => merged.extend(keys),
        _ => return Err(bad(&"expected a YAML mapping such as '{steps: \"50\"}'")),
    }
    serde_yaml::from_value(Value::Mapping(merged)).map_err(|e| bad(&e))
}

/// Sets `a.b.c` in `root` to the YAML value after `=`, creating mappings on the way.
pub fn apply_override(root: &mut Value, spec: &str) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("--set `{spec}`: expected KEY=VALUE"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        bail!("--set `{spec}`: malformed key `{key}`");
    }
    let value: Value =
        serde_yaml::from_str(raw).with_context(|| format!("--set `{spec}`: value"))?;
    let mut node = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let map = match node {
            Value::Mapping(m) => m,
            Value::Null => {
                *node = Value::Mapping(Mapping::new());
                let Value::Mapping(m) = node else {
                    unreachable!()
                };
                m
            }
            _ => bail!(
                "--set `{spec}`: `{}` is not a section",
                parts[..i].join(".")
            ),
        };
        let k = Value::String((*part).to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    Ok(())
}
