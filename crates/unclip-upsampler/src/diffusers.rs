//! The upsampler as a diffusers `UNet2DModel` directory (`config.json` +
//! `diffusion_pytorch_model.safetensors`), the form of the UnCLIP pipeline's `super_res_first` /
//! `super_res_last` (e.g. Karlo's): written from a run, read back or from diffusers. The module
//! paths are the same, so the weights need no renaming.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};
use tch::{nn, Device};
use unclip_decoder::pretrained::{component_weights, read_json, write_component};
use unclip_train::trainer::{diffusers_component_dir, load_into};

use crate::config::{UpsamplerModelConfig, IMAGE_CHANNELS};
use crate::model::{Upsampler, UNET_PREFIX};

/// `UNet2DModel` options this UNet implements at one value only (key, value as JSON).
const FIXED: &[(&str, &str)] = &[
    ("act_fn", r#""silu""#),
    ("add_attention", "false"),
    ("center_input_sample", "false"),
    ("downsample_padding", "1"),
    ("downsample_type", r#""conv""#),
    ("upsample_type", r#""conv""#),
    ("flip_sin_to_cos", "true"),
    ("freq_shift", "0"),
    ("mid_block_scale_factor", "1"),
    ("time_embedding_type", r#""positional""#),
    ("mid_block_type", r#""UNetMidBlock2D""#),
];

/// Options that must be absent or null.
const NULL: &[&str] = &["class_embed_type", "num_class_embeds", "time_embedding_dim"];

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

impl UpsamplerModelConfig {
    /// The upsampler a diffusers `UNet2DModel` config.json describes; `source` names it in errors.
    pub fn from_diffusers_json(json: &Map<String, Value>, source: &str) -> Result<Self> {
        for (key, expected) in FIXED {
            let expected: Value = serde_json::from_str(expected)?;
            if let Some(v) = json.get(*key) {
                ensure!(
                    same(v, &expected),
                    "{source}: `{key}` is {v}; this upsampler implements only {expected}"
                );
            }
        }
        // add_attention defaults to true in diffusers: it must be stated false.
        ensure!(
            json.get("add_attention") == Some(&Value::Bool(false)),
            "{source}: `add_attention` must be false (the upsamplers have no attention)"
        );
        for key in NULL {
            if let Some(v) = json.get(*key).filter(|v| !v.is_null()) {
                bail!("{source}: `{key}` is {v}; this upsampler has no such part (null only)");
            }
        }
        let strings = |key: &str, want: &str| -> Result<usize> {
            let Some(Value::Array(types)) = json.get(key) else {
                bail!("{source}: no `{key}` list");
            };
            ensure!(
                types.iter().all(|t| t.as_str() == Some(want)),
                "{source}: `{key}` {types:?}: this upsampler has only {want} levels"
            );
            Ok(types.len())
        };
        let levels = strings("down_block_types", "ResnetDownsampleBlock2D")?;
        ensure!(
            strings("up_block_types", "ResnetUpsampleBlock2D")? == levels,
            "{source}: down_block_types and up_block_types differ in length"
        );
        ensure!(
            json.get("in_channels").and_then(Value::as_i64) == Some(2 * IMAGE_CHANNELS),
            "{source}: `in_channels` must be 6 (the noisy image and the upsampled conditioning)"
        );
        let mut picked: Map<String, Value> = [
            "out_channels",
            "block_out_channels",
            "layers_per_block",
            "norm_num_groups",
            "norm_eps",
            "dropout",
        ]
        .iter()
        .filter_map(|k| {
            json.get(*k)
                .filter(|v| !v.is_null())
                .map(|v| (k.to_string(), v.clone()))
        })
        .collect();
        // diffusers' default out_channels is 3, ours 6, and its default resnet_time_scale_shift
        // `default`, ours `scale_shift`: take theirs when unstated.
        picked
            .entry("out_channels")
            .or_insert(Value::from(IMAGE_CHANNELS));
        let shift = json
            .get("resnet_time_scale_shift")
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(Value::from("default"));
        ensure!(
            matches!(shift.as_str(), Some("scale_shift" | "default")),
            "{source}: `resnet_time_scale_shift` is {shift}; this upsampler implements \"scale_shift\" and \"default\""
        );
        picked.insert("resnet_time_scale_shift".into(), shift);
        let cfg: Self = serde_json::from_value(Value::Object(picked))
            .with_context(|| format!("{source}: config.json"))?;
        ensure!(
            cfg.block_out_channels.len() == levels,
            "{source}: block_out_channels has {} entries for {levels} levels",
            cfg.block_out_channels.len()
        );
        cfg.validate().with_context(|| source.to_string())?;
        Ok(cfg)
    }

    /// The `UNet2DModel` config.json for this upsampler at `sample_size`.
    pub fn to_diffusers_json(&self, sample_size: i64) -> Result<Value> {
        let n = self.block_out_channels.len();
        let mut map = Map::new();
        map.insert("_class_name".into(), "UNet2DModel".into());
        map.insert("sample_size".into(), sample_size.into());
        map.insert("in_channels".into(), self.in_channels().into());
        map.insert("out_channels".into(), self.out_channels.into());
        map.insert(
            "block_out_channels".into(),
            serde_json::to_value(&self.block_out_channels)?,
        );
        map.insert(
            "down_block_types".into(),
            vec!["ResnetDownsampleBlock2D"; n].into(),
        );
        map.insert(
            "up_block_types".into(),
            vec!["ResnetUpsampleBlock2D"; n].into(),
        );
        map.insert("layers_per_block".into(), self.layers_per_block.into());
        map.insert("norm_num_groups".into(), self.norm_num_groups.into());
        map.insert("norm_eps".into(), self.norm_eps.into());
        map.insert("dropout".into(), self.dropout.into());
        map.insert(
            "resnet_time_scale_shift".into(),
            serde_json::to_value(self.resnet_time_scale_shift)?,
        );
        for (key, value) in FIXED {
            map.insert(key.to_string(), serde_json::from_str(value)?);
        }
        Ok(Value::Object(map))
    }
}

/// A loaded diffusers upsampler.
pub struct LoadedUpsampler {
    pub vs: nn::VarStore,
    pub model: Upsampler,
    pub config: UpsamplerModelConfig,
}

/// The upsampler of a diffusers `UNet2DModel` directory (`dir/config.json` and its
/// safetensors), on `device`, trainable.
pub fn load_diffusers_upsampler(dir: &Path, device: Device) -> Result<LoadedUpsampler> {
    let config = read_diffusers_upsampler_config(dir)?;
    let vs = nn::VarStore::new(device);
    let model = Upsampler::new(vs.root(), &config)?;
    load_diffusers_upsampler_weights(&vs, dir)?;
    Ok(LoadedUpsampler { vs, model, config })
}

/// The `UNet2DModel` directory `dir` names: itself, or a UnCLIP pipeline directory's
/// `super_res_first/` (Karlo's 64 → 256 stage, which `super_res_last` only finishes).
pub fn upsampler_dir(dir: &Path) -> Result<PathBuf> {
    diffusers_component_dir(dir, "super_res_first", "UNet2DModel")
}

/// The upsampler a `UNet2DModel` directory's `config.json` describes.
pub fn read_diffusers_upsampler_config(dir: &Path) -> Result<UpsamplerModelConfig> {
    UpsamplerModelConfig::from_diffusers_json(
        &read_json(&dir.join("config.json"))?,
        &dir.display().to_string(),
    )
}

/// Copies a `UNet2DModel` directory's weights into `vs` (built from
/// [`read_diffusers_upsampler_config`]'s config), converted to its kinds; a missing, extra or
/// mis-shaped tensor is an error naming it.
pub fn load_diffusers_upsampler_weights(vs: &nn::VarStore, dir: &Path) -> Result<()> {
    load_into(
        vs,
        &component_weights(dir, UNET_PREFIX)?,
        &dir.display().to_string(),
    )
}

/// Writes the upsampler in `vs` (built from `cfg`) as a diffusers `UNet2DModel` directory that
/// `UNet2DModel.from_pretrained` (and [`load_diffusers_upsampler`]) read; `sample_size` is the
/// side it produces.
pub fn save_diffusers_upsampler(
    vs: &nn::VarStore,
    cfg: &UpsamplerModelConfig,
    sample_size: i64,
    dir: &Path,
) -> Result<()> {
    write_component(vs, UNET_PREFIX, &cfg.to_diffusers_json(sample_size)?, dir)
}
