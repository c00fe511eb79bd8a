//! Prior weights from safetensors in diffusers' names: a diffusers `PriorTransformer` directory
//! (`config.json` + `diffusion_pytorch_model.safetensors`, e.g. Karlo's `prior/`) or a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{nn, Device, Tensor};
use unclip_train::trainer::{diffusers_component_dir, load_into};

use crate::config::PriorConfig;
use crate::model::DiffusionPrior;
use crate::prior::Prior;

/// Copies the tensors of a safetensors file into `vs` (converted to each variable's kind); a
/// missing, unused or mis-shaped tensor is an error naming it and the file.
pub fn load_prior_weights(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let kinds: HashMap<String, tch::Kind> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.kind()))
        .collect();
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .map(|(n, t)| {
            let t = match kinds.get(&n) {
                Some(k) => t.to_kind(*k),
                None => t,
            };
            (n, t)
        })
        .collect();
    load_into(vs, &tensors, &path.display().to_string())
}

pub struct LoadedPrior {
    pub vs: nn::VarStore,
    pub model: DiffusionPrior,
}

/// The `PriorTransformer` directory `dir` names: itself, or a UnCLIP pipeline directory's `prior/`.
pub fn prior_dir(dir: &Path) -> Result<PathBuf> {
    diffusers_component_dir(dir, "prior", "PriorTransformer")
}

/// The prior a `PriorTransformer` directory's `config.json` describes.
pub fn read_diffusers_prior_config(dir: &Path) -> Result<PriorConfig> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    PriorConfig::from_diffusers_json(&text, &config_path.display().to_string())
}

/// Copies a `PriorTransformer` directory's weights (`clip_mean` / `clip_std` included) into `vs`
/// (built from [`read_diffusers_prior_config`]'s config).
pub fn load_diffusers_prior_weights(vs: &nn::VarStore, dir: &Path) -> Result<()> {
    load_prior_weights(vs, &dir.join("diffusion_pytorch_model.safetensors"))
}

/// A diffusers `PriorTransformer` directory, frozen, on `device`.
pub fn load_diffusers_prior(dir: &Path, device: Device) -> Result<LoadedPrior> {
    let cfg = read_diffusers_prior_config(dir)?;
    let mut vs = nn::VarStore::new(device);
    let model = DiffusionPrior::new(vs.root(), &cfg)?;
    load_diffusers_prior_weights(&vs, dir)?;
    vs.freeze();
    Ok(LoadedPrior { vs, model })
}

/// Writes the diffusion prior in `vs` (built from `cfg`, at the root: diffusers' names, with its
/// `clip_mean` / `clip_std`) as a diffusers `PriorTransformer` directory — `config.json` and
/// `diffusion_pytorch_model.safetensors` — that `PriorTransformer.from_pretrained` (and
/// [`load_diffusers_prior`], `prior.init_from`) read.
pub fn save_diffusers_prior(vs: &nn::VarStore, cfg: &PriorConfig, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut config = serde_json::to_value(cfg)?;
    config["_class_name"] = "PriorTransformer".into();
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut tensors = vs.variables().into_iter().collect::<Vec<_>>();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    Tensor::write_safetensors(&tensors, &weights)
        .with_context(|| format!("writing {}", weights.display()))
}

/// A trained prior from a `train-prior` run directory: its resolved `config.yaml` and a
/// checkpoint's weights (EMA weights when present), frozen. The CLIP it was trained with is named
/// by the config's `clip:` key.
pub struct PriorRun {
    pub cfg: crate::task::PriorTrainConfig,
    pub vs: nn::VarStore,
    pub model: Prior,
    /// The checkpoint and which weights, for messages.
    pub source: String,
}

/// `run_dir`'s prior with `checkpoint`'s weights, or the newest complete checkpoint's.
pub fn load_prior_run(
    run_dir: &Path,
    checkpoint: Option<&Path>,
    device: Device,
) -> Result<PriorRun> {
    let (cfg, vs, model, source) = unclip_train::checkpoint::load_frozen_run(
        run_dir,
        checkpoint,
        "train-prior",
        device,
        |p, cfg: &crate::task::PriorTrainConfig| Prior::new(p, &cfg.prior),
    )?;
    Ok(PriorRun {
        cfg,
        vs,
        model,
        source,
    })
}
