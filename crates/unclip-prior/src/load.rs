//! Prior weights from safetensors in diffusers' names: a diffusers `PriorTransformer` directory
//! (`config.json` + `diffusion_pytorch_model.safetensors`, e.g. Karlo's `prior/`) or a file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use tch::{nn, Device, Tensor};
use unclip_train::trainer::load_into;

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

/// A diffusers `PriorTransformer` directory, frozen, on `device`.
pub fn load_diffusers_prior(dir: &Path, device: Device) -> Result<LoadedPrior> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let cfg = PriorConfig::from_diffusers_json(&text, &config_path.display().to_string())?;
    let mut vs = nn::VarStore::new(device);
    let model = DiffusionPrior::new(vs.root(), &cfg)?;
    load_prior_weights(&vs, &dir.join("diffusion_pytorch_model.safetensors"))?;
    vs.freeze();
    Ok(LoadedPrior { vs, model })
}

/// A trained prior from a `train-prior` run directory: its resolved `config.yaml` and the newest
/// complete checkpoint (EMA weights when present), frozen. The CLIP it was trained with is named
/// by the config's `clip:` key.
pub struct PriorRun {
    pub cfg: crate::task::PriorTrainConfig,
    pub vs: nn::VarStore,
    pub model: Prior,
    /// The checkpoint and which weights, for messages.
    pub source: String,
}

pub fn load_prior_run(run_dir: &Path, device: Device) -> Result<PriorRun> {
    let (cfg, vs, model, source) = unclip_train::checkpoint::load_frozen_run(
        run_dir,
        None,
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
