//! A trained CLIP ready for inference, from a `train-clip` run directory (its newest checkpoint,
//! EMA weights when present) or a Hugging Face model directory (`config.json` +
//! `model.safetensors`, e.g. openai/clip-vit-large-patch14).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};
use unclip_data::embeddings::ClipEmbeddings;
use unclip_data::images::{Crop, ImageTransform, Normalize, Resample, CLIP_MEAN, CLIP_STD};
use unclip_diffusion::embedding::l2_normalize;
use unclip_train::checkpoint;

use crate::config::{Activation, ClipConfig, TextConfig, VisionConfig};
use crate::convert::{load_clip_weights, read_clip_weights};
use crate::model::Clip;
use crate::task::ClipTrainConfig;

pub struct LoadedClip {
    /// Holds the weights; frozen.
    pub vs: nn::VarStore,
    pub model: Clip,
    /// The preprocessing the model was trained with.
    pub image: ImageTransform,
    /// What was loaded, for messages.
    pub source: String,
    /// How its embeddings are handed out (z_i here, z_t by [`crate::caption::CaptionEncoder`]):
    /// L2-normalised unless set otherwise ([`LoadedClip::with_embeddings`]).
    pub embeddings: ClipEmbeddings,
}

impl LoadedClip {
    /// This CLIP handing out its embeddings as `embeddings` says (the consuming model's
    /// `clip_embeddings`).
    pub fn with_embeddings(mut self, embeddings: ClipEmbeddings) -> Self {
        self.embeddings = embeddings;
        self
    }

    /// A projection's output `z` [N, D] in this CLIP's convention.
    pub fn convention(&self, z: &Tensor) -> Result<Tensor> {
        Ok(match self.embeddings {
            ClipEmbeddings::Normalized => l2_normalize(z)?,
            ClipEmbeddings::Raw => z.shallow_clone(),
        })
    }

    /// Image embeddings z_i [N, D] (float; L2-normalised or raw as [`LoadedClip::embeddings`]
    /// says) of images already transformed by
    /// [`LoadedClip::image`] (CHW floats each, as `ImageTransform::apply_all` makes them),
    /// `batch_size` at a time: exactly what `embed` stores for the same images.
    pub fn embed_transformed(&self, pixels: &[Vec<f32>], batch_size: usize) -> Result<Tensor> {
        let device = self.vs.device();
        let r = i64::from(self.image.resolution);
        let _g = tch::no_grad_guard();
        let mut embeds = Vec::new();
        for chunk in pixels.chunks(batch_size.max(1)) {
            let flat: Vec<f32> = chunk.iter().flatten().copied().collect();
            let x = Tensor::from_slice(&flat)
                .view([chunk.len() as i64, 3, r, r])
                .to_device(device);
            embeds.push(
                self.convention(&self.model.encode_image(&x)?)?
                    .to_kind(Kind::Float),
            );
        }
        Ok(Tensor::f_cat(&embeds, 0)?)
    }

    /// Image embeddings z_i (in the CLIP's convention) of images in [-1, 1] ([B, 3, H, W], any
    /// size): resized (bilinear, antialiased) to the CLIP's resolution when they differ and
    /// renormalised as the CLIP was trained. At the CLIP's own resolution and crop this is what `embed` stores.
    pub fn embed_images(&self, images: &Tensor) -> Result<Tensor> {
        let r = i64::from(self.image.resolution);
        let _g = tch::no_grad_guard();
        let device = self.vs.device();
        let mut x = images.to_device(device).to_kind(Kind::Float);
        if x.size()[2..] != [r, r] {
            x = x.f_internal_upsample_bilinear2d_aa([r, r], false, None, None)?;
        }
        if self.image.normalize == Normalize::Clip {
            let stats = |v: [f32; 3]| Tensor::from_slice(&v).view([1, 3, 1, 1]).to_device(device);
            x = ((x + 1.0) * 0.5 - stats(CLIP_MEAN)) / stats(CLIP_STD);
        }
        self.convention(&self.model.encode_image(&x)?)
    }
}

impl ClipConfig {
    /// The shape of a transformers `CLIPModel` from its `config.json` (transformers' defaults for
    /// absent fields).
    pub fn from_hf_config(json: &Value) -> Result<Self> {
        let int = |section: &Value, key: &str, default: i64| -> Result<i64> {
            match section.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_i64()
                    .with_context(|| format!("config.json: {key} is not an integer")),
            }
        };
        let empty = Value::Object(Default::default());
        let text = json.get("text_config").unwrap_or(&empty);
        let vision = json.get("vision_config").unwrap_or(&empty);
        let act = |section: &Value| -> Result<Activation> {
            match section
                .get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("quick_gelu")
            {
                "quick_gelu" => Ok(Activation::QuickGelu),
                "gelu" => Ok(Activation::Gelu),
                other => bail!("config.json: hidden_act {other:?} is not supported"),
            }
        };
        let (text_act, vision_act) = (act(text)?, act(vision)?);
        if text_act != vision_act {
            bail!("config.json: the text and vision towers use different activations");
        }
        let cfg = Self {
            embed_dim: int(json, "projection_dim", 512)?,
            vision: VisionConfig {
                image_size: int(vision, "image_size", 224)?,
                patch_size: int(vision, "patch_size", 32)?,
                width: int(vision, "hidden_size", 768)?,
                layers: int(vision, "num_hidden_layers", 12)?,
                heads: int(vision, "num_attention_heads", 12)?,
                mlp_width: Some(int(vision, "intermediate_size", 3072)?),
                resnet_layers: Vec::new(),
            },
            text: TextConfig {
                vocab_size: int(text, "vocab_size", 49_408)?,
                context_length: int(text, "max_position_embeddings", 77)?,
                width: int(text, "hidden_size", 512)?,
                layers: int(text, "num_hidden_layers", 12)?,
                heads: int(text, "num_attention_heads", 8)?,
                mlp_width: Some(int(text, "intermediate_size", 2048)?),
            },
            activation: text_act,
            logit_scale_init: json
                .get("logit_scale_init_value")
                .and_then(Value::as_f64)
                .unwrap_or(2.6592),
            logit_scale_max: 100.0,
            layer_norm_eps: text
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
        };
        cfg.validate().context("config.json")?;
        Ok(cfg)
    }
}

fn build(cfg: &ClipConfig, device: Device) -> Result<(nn::VarStore, Clip)> {
    let vs = nn::VarStore::new(device);
    let model = Clip::new(vs.root(), cfg)?;
    Ok((vs, model))
}

/// Loads CLIP from a run directory or a Hugging Face model directory.
pub fn load_clip(path: &Path, device: Device) -> Result<LoadedClip> {
    if path.join("config.yaml").is_file() {
        let cfg = unclip_train::load_config::<ClipTrainConfig>(&path.join("config.yaml"), &[])?;
        let (weights, source) = checkpoint::inference_weights(path)?;
        let (mut vs, model) = build(&cfg.task.model, device)?;
        load_clip_weights(&vs, &weights.into_iter().collect(), "", &source)?;
        vs.freeze();
        return Ok(LoadedClip {
            vs,
            model,
            image: ImageTransform {
                crop: Crop::Center,
                random_flip: false,
                ..cfg.task.data.image
            },
            source,
            embeddings: ClipEmbeddings::Normalized,
        });
    }
    let config_json = path.join("config.json");
    if config_json.is_file() {
        let json: Value = serde_json::from_slice(
            &std::fs::read(&config_json)
                .with_context(|| format!("reading {}", config_json.display()))?,
        )
        .with_context(|| format!("parsing {}", config_json.display()))?;
        let cfg =
            ClipConfig::from_hf_config(&json).with_context(|| config_json.display().to_string())?;
        let weights_path = path.join("model.safetensors");
        let weights = read_clip_weights(&weights_path)?;
        let (mut vs, model) = build(&cfg, device)?;
        let source = weights_path.display().to_string();
        load_clip_weights(&vs, &weights.into_iter().collect(), "", &source)?;
        vs.freeze();
        return Ok(LoadedClip {
            vs,
            image: ImageTransform {
                resolution: cfg.vision.image_size as u32,
                crop: Crop::Center,
                random_flip: false,
                resample: Resample::Bicubic,
                normalize: Normalize::Clip,
            },
            model,
            source,
            embeddings: ClipEmbeddings::Normalized,
        });
    }
    bail!(
        "{}: neither a train-clip run directory (config.yaml + checkpoints/) nor a Hugging Face CLIP directory (config.json + model.safetensors)",
        path.display()
    )
}

/// A `train-clip` config of a tiny CPU CLIP (32-wide embeddings and text, 16 tokens, 32 px
/// images, one block per tower) for [`write_random_run`] in tests and smoke runs.
pub const TINY_CLIP_CONFIG: &str = "
seed: 0
device: cpu
model:
  embed_dim: 32
  vision: {image_size: 32, patch_size: 16, width: 32, layers: 1, heads: 2}
  text: {context_length: 16, width: 32, layers: 1, heads: 2}
data:
  train: {shards: unused-000000.tar}
  held_out: {shards: unused-000000.tar}
  image: {resolution: 32}
";

/// Writes a `train-clip` run directory holding one checkpoint of a CLIP with CLIP's random
/// initialisation from `seed`: what tests and smoke runs of the later stages (`embed`, the priors,
/// the decoder) load when no trained CLIP is needed. `config_yaml` is a `train-clip` config.
pub fn write_random_run(dir: &Path, config_yaml: &str, seed: i64) -> Result<()> {
    let cfg = unclip_train::config::parse_config::<ClipTrainConfig>(config_yaml, &[])?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("config.yaml"), config_yaml)
        .with_context(|| format!("writing {}/config.yaml", dir.display()))?;
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = Clip::new(vs.root(), &cfg.task.model)?;
    crate::model::init_clip_weights(&vs, &cfg.task.model, "");
    let weights = unclip_train::named_variables(&vs);
    let meta = checkpoint::CheckpointMeta::new(1);
    checkpoint::save(
        &checkpoint::checkpoints_dir(dir),
        &meta,
        &weights,
        None,
        &[],
    )?;
    Ok(())
}
