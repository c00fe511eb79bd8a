//! Loading CLIP weights: transformers' `CLIPModel` safetensors as they are, and OpenAI / open_clip
//! state dicts through this name mapping:
//!
//! | open_clip / OpenAI                                   | transformers (this crate)                              |
//! |------------------------------------------------------|--------------------------------------------------------|
//! | `token_embedding.weight`                             | `text_model.embeddings.token_embedding.weight`         |
//! | `positional_embedding`                               | `text_model.embeddings.position_embedding.weight`      |
//! | `transformer.resblocks.N.ln_1` / `ln_2`              | `text_model.encoder.layers.N.layer_norm1` / `2`        |
//! | `….attn.in_proj_weight` / `_bias` (q, k, v stacked)  | `….self_attn.q_proj` / `k_proj` / `v_proj`             |
//! | `….attn.out_proj`                                    | `….self_attn.out_proj`                                 |
//! | `….mlp.c_fc` / `c_proj`                              | `….mlp.fc1` / `fc2`                                    |
//! | `ln_final`                                           | `text_model.final_layer_norm`                          |
//! | `text_projection` ([width, embed])                   | `text_projection.weight` (transposed)                  |
//! | `visual.class_embedding`                             | `vision_model.embeddings.class_embedding`              |
//! | `visual.positional_embedding`                        | `vision_model.embeddings.position_embedding.weight`    |
//! | `visual.conv1.weight`                                | `vision_model.embeddings.patch_embedding.weight`       |
//! | `visual.ln_pre` / `visual.ln_post`                   | `vision_model.pre_layrnorm` / `post_layernorm`         |
//! | `visual.transformer.resblocks.N.…`                   | `vision_model.encoder.layers.N.…` (as for text)        |
//! | `visual.proj` ([width, embed])                       | `visual_projection.weight` (transposed)                |
//! | `logit_scale`                                        | `logit_scale`                                          |
//! | ResNet tower (`visual.attnpool.…` present): `visual.…` | unchanged (transformers has no ResNet CLIP)          |
//!
//! Non-weight entries of OpenAI's files (`input_resolution`, `context_length`, `vocab_size`,
//! `attn_mask`), BatchNorm's `num_batches_tracked` and transformers' `position_ids` buffers are
//! ignored.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::Tensor;

/// The layout a state dict uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Transformers,
    OpenClip,
}

fn is_ignored(name: &str) -> bool {
    name.ends_with("position_ids")
        || name.ends_with("num_batches_tracked")
        || matches!(
            name,
            "input_resolution" | "context_length" | "vocab_size" | "attn_mask"
        )
}

/// Which layout `names` follow.
/// Ours with a ResNet tower mix the two (`text_model.…` with `visual.…`): transformers' names win.
pub fn detect_format<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<WeightFormat> {
    let mut open_clip = false;
    for name in names {
        if name.starts_with("text_model.") || name.starts_with("vision_model.") {
            return Ok(WeightFormat::Transformers);
        }
        open_clip |= name.starts_with("visual.") || name == "token_embedding.weight";
    }
    if open_clip {
        return Ok(WeightFormat::OpenClip);
    }
    bail!("neither transformers' CLIPModel names nor open_clip's were found")
}

fn block(
    rest: &str,
    out_prefix: &str,
    tensor: Tensor,
    out: &mut Vec<(String, Tensor)>,
) -> Result<bool> {
    // rest = "N.<sub>"
    let Some((n, sub)) = rest.split_once('.') else {
        return Ok(false);
    };
    let layer = format!("{out_prefix}.encoder.layers.{n}");
    let simple = |s: &str| -> Option<&'static str> {
        Some(match s {
            "ln_1.weight" => "layer_norm1.weight",
            "ln_1.bias" => "layer_norm1.bias",
            "ln_2.weight" => "layer_norm2.weight",
            "ln_2.bias" => "layer_norm2.bias",
            "attn.out_proj.weight" => "self_attn.out_proj.weight",
            "attn.out_proj.bias" => "self_attn.out_proj.bias",
            "mlp.c_fc.weight" => "mlp.fc1.weight",
            "mlp.c_fc.bias" => "mlp.fc1.bias",
            "mlp.c_proj.weight" => "mlp.fc2.weight",
            "mlp.c_proj.bias" => "mlp.fc2.bias",
            _ => return None,
        })
    };
    if let Some(name) = simple(sub) {
        out.push((format!("{layer}.{name}"), tensor));
        return Ok(true);
    }
    let kind = match sub {
        "attn.in_proj_weight" => "weight",
        "attn.in_proj_bias" => "bias",
        _ => return Ok(false),
    };
    let parts = tensor.f_chunk(3, 0)?;
    for (proj, part) in ["q_proj", "k_proj", "v_proj"].iter().zip(parts) {
        out.push((
            format!("{layer}.self_attn.{proj}.{kind}"),
            part.contiguous(),
        ));
    }
    Ok(true)
}

/// open_clip / OpenAI names → transformers names (see the module docs). Unknown names are errors.
pub fn open_clip_to_transformers(
    state: impl IntoIterator<Item = (String, Tensor)>,
) -> Result<Vec<(String, Tensor)>> {
    let state: Vec<(String, Tensor)> = state.into_iter().collect();
    // A ResNet tower keeps open_clip's names here (transformers has none for it).
    let resnet = state.iter().any(|(n, _)| n.starts_with("visual.attnpool."));
    let mut out = Vec::new();
    for (name, t) in state {
        if is_ignored(&name) {
            continue;
        }
        if resnet && name.starts_with("visual.") {
            out.push((name, t));
            continue;
        }
        let direct = match name.as_str() {
            "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
            "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
            "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
            "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
            "logit_scale" => Some("logit_scale"),
            "visual.class_embedding" => Some("vision_model.embeddings.class_embedding"),
            "visual.positional_embedding" => {
                Some("vision_model.embeddings.position_embedding.weight")
            }
            "visual.conv1.weight" => Some("vision_model.embeddings.patch_embedding.weight"),
            "visual.ln_pre.weight" => Some("vision_model.pre_layrnorm.weight"),
            "visual.ln_pre.bias" => Some("vision_model.pre_layrnorm.bias"),
            "visual.ln_post.weight" => Some("vision_model.post_layernorm.weight"),
            "visual.ln_post.bias" => Some("vision_model.post_layernorm.bias"),
            _ => None,
        };
        if let Some(target) = direct {
            out.push((target.to_string(), t));
            continue;
        }
        match name.as_str() {
            "text_projection" => {
                out.push(("text_projection.weight".into(), t.tr().contiguous()));
                continue;
            }
            "visual.proj" => {
                out.push(("visual_projection.weight".into(), t.tr().contiguous()));
                continue;
            }
            _ => {}
        }
        let handled = if let Some(rest) = name.strip_prefix("visual.transformer.resblocks.") {
            block(rest, "vision_model", t, &mut out)?
        } else if let Some(rest) = name.strip_prefix("transformer.resblocks.") {
            block(rest, "text_model", t, &mut out)?
        } else {
            false
        };
        if !handled {
            bail!("open_clip weight {name:?} has no transformers equivalent in this model");
        }
    }
    Ok(out)
}

/// A state dict in transformers' names from a safetensors file in either layout.
pub fn read_clip_weights(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let tensors = Tensor::read_safetensors(path)
        .with_context(|| format!("reading CLIP weights {}", path.display()))?;
    let format = detect_format(tensors.iter().map(|(n, _)| n.as_str()))
        .with_context(|| path.display().to_string())?;
    let named = match format {
        WeightFormat::Transformers => tensors
            .into_iter()
            .filter(|(n, _)| !is_ignored(n))
            .collect(),
        WeightFormat::OpenClip => {
            open_clip_to_transformers(tensors).with_context(|| path.display().to_string())?
        }
    };
    Ok(named.into_iter().collect())
}

/// Copies `weights` into `vs` under `prefix` ("" at the root); every variable must be given, with
/// its shape, and every weight must be used.
pub fn load_clip_weights(
    vs: &tch::nn::VarStore,
    weights: &BTreeMap<String, Tensor>,
    prefix: &str,
    source: &str,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let mut vars = vs.variables();
    let mut used = 0usize;
    for (name, var) in vars
        .iter_mut()
        .filter_map(|(n, v)| n.strip_prefix(prefix).map(|short| (short.to_string(), v)))
    {
        let w = weights
            .get(&name)
            .with_context(|| format!("{source}: missing weight {name}"))?;
        if w.size() != var.size() {
            bail!(
                "{source}: {name} has shape {:?}, the model expects {:?}",
                w.size(),
                var.size()
            );
        }
        var.copy_(&w.to_kind(var.kind()).to_device(var.device()));
        used += 1;
    }
    if used != weights.len() {
        let unused: Vec<&String> = weights
            .keys()
            .filter(|k| !vars.contains_key(&format!("{prefix}{k}")))
            .take(5)
            .collect();
        bail!(
            "{source}: {} weights do not belong to this model's shape, e.g. {unused:?}",
            weights.len() - used
        );
    }
    Ok(())
}
