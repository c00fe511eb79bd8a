//! A pretrained decoder from a diffusers UnCLIP pipeline directory (e.g. Karlo's
//! `kakaobrain/karlo-v1-alpha`): `decoder/` (`UNet2DConditionModel`) and `text_proj/`
//! (`UnCLIPTextProjModel`), each a `config.json` with `diffusion_pytorch_model.safetensors`
//! (or a sharded `….safetensors.index.json`). The module paths are the same, so the weights load
//! with no renaming, under `decoder.` and `text_proj.`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};
use tch::{nn, Device, Tensor};
use unclip_train::trainer::load_into;

use crate::config::{DecoderModelConfig, IMAGE_CHANNELS};
use crate::model::UnclipDecoder;
use crate::unet::UNetConfig;

/// `UNet2DConditionModel` options this UNet implements only at one value: a config.json that
/// sets one of them otherwise describes another model, whose weights might even load.
/// (key, value as JSON).
const FIXED: &[(&str, &str)] = &[
    ("act_fn", r#""silu""#),
    ("center_input_sample", "false"),
    ("class_embed_type", r#""identity""#),
    ("mid_block_type", r#""UNetMidBlock2DSimpleCrossAttn""#),
    ("resnet_time_scale_shift", r#""scale_shift""#),
    ("flip_sin_to_cos", "true"),
    ("freq_shift", "0"),
    ("downsample_padding", "1"),
    ("mid_block_scale_factor", "1"),
    ("only_cross_attention", "false"),
    ("dual_cross_attention", "false"),
    ("use_linear_projection", "false"),
    ("time_embedding_type", r#""positional""#),
    ("conv_in_kernel", "3"),
    ("conv_out_kernel", "3"),
    ("resnet_skip_time_act", "false"),
    ("resnet_out_scale_factor", "1"),
    ("transformer_layers_per_block", "1"),
    ("class_embeddings_concat", "false"),
];

/// Options that must be absent or null (extra embeddings and projections this UNet lacks).
const NULL: &[&str] = &[
    "addition_embed_type",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "num_class_embeds",
    "time_cond_proj_dim",
    "time_embedding_dim",
    "time_embedding_act_fn",
    "timestep_post_act",
    "projection_class_embeddings_input_dim",
    "cross_attention_norm",
    "num_attention_heads",
    "reverse_transformer_layers_per_block",
];

/// The UNet's keys that [`UNetConfig`] reads (diffusers' names).
const READ: &[&str] = &[
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "norm_num_groups",
    "norm_eps",
    "dropout",
];

fn same_number(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// A JSON object from `path`; errors name the file.
pub fn read_json(path: &Path) -> Result<Map<String, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))? {
        Value::Object(map) => Ok(map),
        _ => bail!("{}: not a JSON object", path.display()),
    }
}

impl DecoderModelConfig {
    /// The decoder's shape from diffusers' `decoder/config.json` (UNet) and
    /// `text_proj/config.json`; `source` names them in errors.
    pub fn from_diffusers_json(
        unet: &Map<String, Value>,
        text_proj: &Map<String, Value>,
        source: &str,
    ) -> Result<Self> {
        for (key, expected) in FIXED {
            let expected: Value = serde_json::from_str(expected)?;
            if let Some(v) = unet.get(*key) {
                ensure!(
                    same_number(v, &expected),
                    "{source}: decoder/config.json `{key}` is {v}; this decoder implements only {expected}"
                );
            }
        }
        for key in NULL {
            if let Some(v) = unet.get(*key).filter(|v| !v.is_null()) {
                bail!("{source}: decoder/config.json `{key}` is {v}; this decoder has no such part (null only)");
            }
        }
        let mut picked: Map<String, Value> = READ
            .iter()
            .filter_map(|k| unet.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        // diffusers allows one head width per level; this UNet one for all.
        if let Some(Value::Array(dims)) = picked.get("attention_head_dim").cloned() {
            ensure!(
                dims.windows(2).all(|w| w[0] == w[1]) && !dims.is_empty(),
                "{source}: decoder/config.json `attention_head_dim` {dims:?}: per-level head widths are not supported"
            );
            picked.insert("attention_head_dim".into(), dims[0].clone());
        }
        if picked.get("dropout").is_some_and(Value::is_null) {
            picked.remove("dropout");
        }
        let unet_cfg: UNetConfig = serde_json::from_value(Value::Object(picked))
            .with_context(|| format!("{source}: decoder/config.json"))?;
        let get = |key: &str| -> Result<i64> {
            text_proj
                .get(key)
                .and_then(Value::as_i64)
                .with_context(|| format!("{source}: text_proj/config.json lacks integer `{key}`"))
        };
        let cfg = DecoderModelConfig {
            clip_embeddings_dim: get("clip_embeddings_dim")?,
            clip_extra_context_tokens: get("clip_extra_context_tokens")?,
            // diffusers has no self-conditioning; a UNet that takes twice the image's channels
            // is one `save_diffusers_decoder` wrote from a self-conditioned decoder.
            self_condition: unet_cfg.in_channels == 2 * IMAGE_CHANNELS,
            unet: unet_cfg,
        };
        let (ctx, temb) = (get("cross_attention_dim")?, get("time_embed_dim")?);
        ensure!(
            ctx == cfg.unet.cross_attention_dim && temb == cfg.unet.time_embed_dim(),
            "{source}: text_proj/config.json (cross_attention_dim {ctx}, time_embed_dim {temb}) does not fit the UNet's ({}, {})",
            cfg.unet.cross_attention_dim,
            cfg.unet.time_embed_dim()
        );
        cfg.validate().with_context(|| source.to_string())?;
        Ok(cfg)
    }
}

/// The tensors of one pipeline component (`dir`), names prefixed with `prefix.`: a single
/// `diffusion_pytorch_model.safetensors` or the shards its `.index.json` lists.
pub fn component_weights(dir: &Path, prefix: &str) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("diffusion_pytorch_model.safetensors");
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let map = read_json(&index)?;
        let Some(Value::Object(weight_map)) = map.get("weight_map") else {
            bail!("{}: no `weight_map`", index.display());
        };
        let mut shards: Vec<String> = weight_map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards.iter().map(|s| dir.join(s)).collect()
    } else {
        bail!(
            "{}: neither diffusion_pytorch_model.safetensors nor its .index.json (convert .bin weights to safetensors first)",
            dir.display()
        );
    };
    let mut out = HashMap::new();
    for file in files {
        for (name, t) in Tensor::read_safetensors(&file)
            .with_context(|| format!("reading {}", file.display()))?
        {
            out.insert(format!("{prefix}.{name}"), t);
        }
    }
    Ok(out)
}

pub struct LoadedDecoder {
    pub vs: nn::VarStore,
    pub model: UnclipDecoder,
    pub config: DecoderModelConfig,
}

/// The decoder's shape from a diffusers UnCLIP pipeline directory's `decoder/config.json` and
/// `text_proj/config.json`.
pub fn read_diffusers_decoder_config(dir: &Path) -> Result<DecoderModelConfig> {
    DecoderModelConfig::from_diffusers_json(
        &read_json(&dir.join("decoder").join("config.json"))?,
        &read_json(&dir.join("text_proj").join("config.json"))?,
        &dir.display().to_string(),
    )
}

/// Copies a pipeline directory's `decoder/` and `text_proj/` weights into `vs` (built from
/// [`read_diffusers_decoder_config`]'s config), converted to fp32; a missing, extra or mis-shaped
/// tensor is an error naming it.
pub fn load_diffusers_decoder_weights(vs: &nn::VarStore, dir: &Path) -> Result<()> {
    let mut weights = component_weights(&dir.join("decoder"), "decoder")?;
    weights.extend(component_weights(&dir.join("text_proj"), "text_proj")?);
    load_into(vs, &weights, &dir.display().to_string())
}

/// The decoder of a diffusers UnCLIP pipeline directory (`dir/decoder`, `dir/text_proj`), on
/// `device`, trainable (fine-tuning) — freeze `vs` for inference.
pub fn load_diffusers_decoder(dir: &Path, device: Device) -> Result<LoadedDecoder> {
    let config = read_diffusers_decoder_config(dir)?;
    let vs = nn::VarStore::new(device);
    let model = UnclipDecoder::from_config(vs.root(), &config)?;
    load_diffusers_decoder_weights(&vs, dir)?;
    Ok(LoadedDecoder { vs, model, config })
}

/// Writes the decoder in `vs` (built from `cfg`) as a diffusers UnCLIP pipeline's `decoder/` and
/// `text_proj/` under `dir` — config.json and `diffusion_pytorch_model.safetensors` each — so
/// diffusers' `UNet2DConditionModel.from_pretrained` / `UnCLIPTextProjModel.from_pretrained`
/// (and [`load_diffusers_decoder`]) read it. `sample_size` is the image side it was trained at.
pub fn save_diffusers_decoder(
    vs: &nn::VarStore,
    cfg: &DecoderModelConfig,
    sample_size: i64,
    dir: &Path,
) -> Result<()> {
    let mut unet = match serde_json::to_value(&cfg.unet)? {
        Value::Object(map) => map,
        _ => bail!("UNet config did not serialise to an object"),
    };
    unet.insert("_class_name".into(), "UNet2DConditionModel".into());
    unet.insert("sample_size".into(), sample_size.into());
    for (key, value) in FIXED {
        unet.insert(key.to_string(), serde_json::from_str(value)?);
    }
    let text_proj = serde_json::json!({
        "_class_name": "UnCLIPTextProjModel",
        "clip_embeddings_dim": cfg.clip_embeddings_dim,
        "clip_extra_context_tokens": cfg.clip_extra_context_tokens,
        "cross_attention_dim": cfg.unet.cross_attention_dim,
        "time_embed_dim": cfg.unet.time_embed_dim(),
    });
    for (component, config) in [("decoder", Value::Object(unet)), ("text_proj", text_proj)] {
        write_component(vs, component, &config, &dir.join(component))?;
    }
    Ok(())
}

/// Writes one diffusers component into `dir`: `config` as `config.json` and the variables of `vs`
/// under `prefix.` (the prefix dropped; all of them for an empty prefix) as
/// `diffusion_pytorch_model.safetensors`.
pub fn write_component(vs: &nn::VarStore, prefix: &str, config: &Value, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}.")
    };
    let mut tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix(&prefix).map(|s| (s.to_string(), t)))
        .collect();
    ensure!(!tensors.is_empty(), "no `{prefix}*` variables to export");
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    Tensor::write_safetensors(&tensors, &weights)
        .with_context(|| format!("writing {}", weights.display()))?;
    Ok(())
}
