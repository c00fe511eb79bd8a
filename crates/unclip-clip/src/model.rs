//! CLIP (Radford et al. 2021): a ViT (or CLIP's ResNet) image encoder and a causal text transformer
//! projected into one space. Module paths are transformers' `CLIPModel` state-dict names
//! (`text_model.encoder.layers.0.self_attn.q_proj.weight`, `vision_model.pre_layrnorm`, …), so its
//! safetensors load unchanged; the ResNet tower, which transformers lacks, has open_clip's
//! (`visual.…`, see [`crate::resnet`]).

use anyhow::{bail, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};
use unclip_diffusion::nn::checkpoint::{checkpoint_one, Shared};
use unclip_diffusion::nn::{AttentionMask, MultiHeadAttention};

use crate::config::{Activation, ClipConfig, TextConfig, VisionConfig};
use crate::resnet::ModifiedResNet;

const HF_ATTENTION: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// transformers' `CLIPEncoderLayer`: pre-LN attention and MLP with residuals.
#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: nn::LayerNorm,
    self_attn: MultiHeadAttention,
    layer_norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(p: nn::Path, width: i64, heads: i64, mlp: i64, cfg: &ClipConfig) -> Result<Self> {
        let ln = nn::LayerNormConfig {
            eps: cfg.layer_norm_eps,
            ..Default::default()
        };
        Ok(Self {
            layer_norm1: nn::layer_norm(&p / "layer_norm1", vec![width], ln),
            self_attn: MultiHeadAttention::with_names(
                &p / "self_attn",
                width,
                width,
                heads,
                HF_ATTENTION,
            )?,
            layer_norm2: nn::layer_norm(&p / "layer_norm2", vec![width], ln),
            fc1: nn::linear(&p / "mlp" / "fc1", width, mlp, Default::default()),
            fc2: nn::linear(&p / "mlp" / "fc2", mlp, width, Default::default()),
            activation: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let mask = AttentionMask {
            causal,
            key_padding: None,
        };
        let x = x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x), None, mask)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x));
        let h = match self.activation {
            Activation::QuickGelu => &h * (&h * 1.702).sigmoid(),
            Activation::Gelu => h.gelu("none"),
        };
        Ok(&x + self.fc2.forward(&h))
    }
}

fn encoder(
    p: nn::Path,
    width: i64,
    layers: i64,
    heads: i64,
    mlp: i64,
    cfg: &ClipConfig,
) -> Result<Vec<Shared<EncoderLayer>>> {
    (0..layers)
        .map(|i| EncoderLayer::new(&p / "layers" / i, width, heads, mlp, cfg).map(Shared::new))
        .collect()
}

/// The layers in turn; with `checkpointing`, each recomputed in backward instead of keeping its
/// activations (no effect where nothing needs a gradient).
fn run(
    layers: &[Shared<EncoderLayer>],
    x: Tensor,
    causal: bool,
    checkpointing: bool,
) -> Result<Tensor> {
    layers.iter().try_fold(x, |x, l| {
        if !checkpointing {
            return l.forward(&x, causal);
        }
        let layer = l.clone();
        Ok(checkpoint_one(&[&x], move |xs: &[Tensor]| {
            layer.forward(&xs[0], causal)
        })?)
    })
}

/// The text tower's outputs.
#[derive(Debug)]
pub struct TextFeatures {
    /// Projected features at each caption's end token (not normalised): [B, embed_dim].
    pub embeds: Tensor,
    /// Per-token features after the final layer norm, before projection: [B, L, text width].
    /// The priors and the decoder attend to these.
    pub tokens: Tensor,
}

#[derive(Debug)]
pub struct TextTransformer {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<Shared<EncoderLayer>>,
    /// Recompute the layers in backward (see [`Clip::set_gradient_checkpointing`]).
    checkpointing: bool,
    final_layer_norm: nn::LayerNorm,
    cfg: TextConfig,
}

impl TextTransformer {
    fn new(p: nn::Path, cfg: &ClipConfig) -> Result<Self> {
        let t = &cfg.text;
        let e = &p / "embeddings";
        Ok(Self {
            token_embedding: nn::embedding(
                &e / "token_embedding",
                t.vocab_size,
                t.width,
                Default::default(),
            ),
            position_embedding: nn::embedding(
                &e / "position_embedding",
                t.context_length,
                t.width,
                Default::default(),
            ),
            layers: encoder(&p / "encoder", t.width, t.layers, t.heads, t.mlp(), cfg)?,
            checkpointing: false,
            final_layer_norm: nn::layer_norm(
                &p / "final_layer_norm",
                vec![t.width],
                nn::LayerNormConfig {
                    eps: cfg.layer_norm_eps,
                    ..Default::default()
                },
            ),
            cfg: t.clone(),
        })
    }

    /// ids: [B, L] int64, L ≤ context_length, each row `<start> … <end> 0…`. Returns the hidden
    /// states after the final layer norm and the index of each row's end token (the largest id,
    /// as in CLIP).
    fn forward(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let size = ids.size();
        if size.len() != 2 || size[1] > self.cfg.context_length || size[1] == 0 {
            bail!(
                "text ids must be [B, L] with 1 <= L <= {}, got {size:?}",
                self.cfg.context_length
            );
        }
        let positions = Tensor::arange(size[1], (Kind::Int64, ids.device()));
        let x = self.token_embedding.forward(ids) + self.position_embedding.forward(&positions);
        let x = run(&self.layers, x, true, self.checkpointing)?;
        let hidden = self.final_layer_norm.forward(&x);
        let end = ids.argmax(-1, false);
        Ok((hidden, end))
    }
}

#[derive(Debug)]
pub struct VisionTransformer {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<Shared<EncoderLayer>>,
    /// Recompute the layers in backward (see [`Clip::set_gradient_checkpointing`]).
    checkpointing: bool,
    post_layernorm: nn::LayerNorm,
    cfg: VisionConfig,
}

impl VisionTransformer {
    fn new(p: nn::Path, cfg: &ClipConfig) -> Result<Self> {
        let v = &cfg.vision;
        let e = &p / "embeddings";
        let ln = nn::LayerNormConfig {
            eps: cfg.layer_norm_eps,
            ..Default::default()
        };
        Ok(Self {
            class_embedding: e.var(
                "class_embedding",
                &[v.width],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: (v.width as f64).powf(-0.5),
                },
            ),
            patch_embedding: nn::conv2d(
                &e / "patch_embedding",
                3,
                v.width,
                v.patch_size,
                nn::ConvConfig {
                    stride: v.patch_size,
                    bias: false,
                    ..Default::default()
                },
            ),
            position_embedding: nn::embedding(
                &e / "position_embedding",
                v.patches() + 1,
                v.width,
                Default::default(),
            ),
            pre_layrnorm: nn::layer_norm(&p / "pre_layrnorm", vec![v.width], ln),
            layers: encoder(&p / "encoder", v.width, v.layers, v.heads, v.mlp(), cfg)?,
            checkpointing: false,
            post_layernorm: nn::layer_norm(&p / "post_layernorm", vec![v.width], ln),
            cfg: v.clone(),
        })
    }

    /// pixels: [B, 3, S, S] → the class token's output after the post layer norm: [B, width].
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let s = self.cfg.image_size;
        let size = pixels.size();
        if size.len() != 4 || size[1] != 3 || size[2] != s || size[3] != s {
            bail!("images must be [B, 3, {s}, {s}], got {size:?}");
        }
        let b = size[0];
        let patches = self
            .patch_embedding
            .forward(pixels)
            .flatten(2, 3)
            .transpose(1, 2);
        let class = self
            .class_embedding
            .view([1, 1, self.cfg.width])
            .expand([b, 1, self.cfg.width], false)
            .to_kind(patches.kind());
        let x = Tensor::cat(&[class, patches], 1);
        let positions = Tensor::arange(self.cfg.patches() + 1, (Kind::Int64, pixels.device()));
        let x = self
            .pre_layrnorm
            .forward(&(x + self.position_embedding.forward(&positions)));
        let x = run(&self.layers, x, false, self.checkpointing)?;
        Ok(self.post_layernorm.forward(&x.select(1, 0)))
    }
}

/// The image tower: a ViT whose class token is projected by `visual_projection`, or CLIP's ResNet,
/// whose attention pool projects itself.
#[derive(Debug)]
pub enum ImageEncoder {
    Vit {
        vision_model: Box<VisionTransformer>,
        visual_projection: nn::Linear,
    },
    ResNet(Box<ModifiedResNet>),
}

#[derive(Debug)]
pub struct Clip {
    pub text_model: TextTransformer,
    pub image_encoder: ImageEncoder,
    text_projection: nn::Linear,
    logit_scale: Tensor,
    /// Training mode: batch statistics in the ResNet's norms (the ViT has none). Off after
    /// construction, so a loaded CLIP embeds deterministically; the CLIP trainer switches it on.
    training: std::sync::atomic::AtomicBool,
    pub cfg: ClipConfig,
}

impl Clip {
    /// Builds CLIP under `p` (the root, for transformers' names).
    pub fn new(p: nn::Path, cfg: &ClipConfig) -> Result<Self> {
        cfg.validate()?;
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        let image_encoder = if cfg.vision.is_resnet() {
            let resnet = ModifiedResNet::new(&p / "visual", &cfg.vision, cfg.embed_dim)?;
            ImageEncoder::ResNet(Box::new(resnet))
        } else {
            ImageEncoder::Vit {
                vision_model: Box::new(VisionTransformer::new(&p / "vision_model", cfg)?),
                visual_projection: nn::linear(
                    &p / "visual_projection",
                    cfg.vision.width,
                    cfg.embed_dim,
                    no_bias,
                ),
            }
        };
        Ok(Self {
            text_model: TextTransformer::new(&p / "text_model", cfg)?,
            image_encoder,
            text_projection: nn::linear(
                &p / "text_projection",
                cfg.text.width,
                cfg.embed_dim,
                no_bias,
            ),
            logit_scale: p.var("logit_scale", &[], nn::Init::Const(cfg.logit_scale_init)),
            training: false.into(),
            cfg: cfg.clone(),
        })
    }

    /// With `on`, the transformer layers (the text tower's and a ViT's; not a ResNet's blocks) keep
    /// only their inputs when gradients are needed and recompute their activations in backward.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.text_model.checkpointing = on;
        if let ImageEncoder::Vit { vision_model, .. } = &mut self.image_encoder {
            vision_model.checkpointing = on;
        }
    }

    /// Switches training mode (see `training`); returns the previous mode.
    pub fn set_training(&self, on: bool) -> bool {
        self.training.swap(on, std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_training(&self) -> bool {
        self.training.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Projected image embeddings (not normalised): [B, embed_dim].
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        match &self.image_encoder {
            ImageEncoder::Vit {
                vision_model,
                visual_projection,
            } => Ok(visual_projection.forward(&vision_model.forward(pixels)?)),
            ImageEncoder::ResNet(resnet) => resnet.forward(pixels, self.is_training()),
        }
    }

    /// Projected text embeddings at the end token and the per-token features.
    pub fn encode_text(&self, ids: &Tensor) -> Result<TextFeatures> {
        let (hidden, end) = self.text_model.forward(ids)?;
        let b = hidden.size()[0];
        let pooled = hidden.index(&[
            Some(Tensor::arange(b, (Kind::Int64, hidden.device()))),
            Some(end),
        ]);
        Ok(TextFeatures {
            embeds: self.text_projection.forward(&pooled),
            tokens: hidden,
        })
    }

    /// exp(logit_scale), the learned inverse temperature, clamped at `logit_scale_max`.
    pub fn logit_scale(&self) -> Tensor {
        self.logit_scale
            .clamp_max(self.cfg.logit_scale_max.ln())
            .exp()
    }
}

/// open_clip's initialisation (CLIP's): small normal embeddings, attention and MLP weights scaled
/// by width and depth, zero biases. tch's defaults (unit-variance embeddings, Kaiming linears)
/// train CLIP noticeably worse. `prefix` is where the model sits in `vs` ("" at the root).
pub fn init_clip_weights(vs: &nn::VarStore, cfg: &ClipConfig, prefix: &str) {
    let _guard = tch::no_grad_guard();
    // In name order: every draw comes from the global generator, and `variables()` is a HashMap
    // whose order changes from run to run.
    let sorted: std::collections::BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    for (name, mut var) in sorted {
        let Some(name) = name.strip_prefix(prefix) else {
            continue;
        };
        if name.starts_with("visual.") {
            resnet_init(name, &mut var, cfg);
            continue;
        }
        let (width, layers) = if name.starts_with("vision_model") {
            (cfg.vision.width, cfg.vision.layers)
        } else {
            (cfg.text.width, cfg.text.layers)
        };
        let w = (width as f64).powf(-0.5);
        let proj_std = w * ((2 * layers) as f64).powf(-0.5);
        let std = if name.ends_with(".bias") {
            if !name.contains("layer_norm") && !name.contains("layrnorm") {
                let _ = var.zero_();
            }
            continue;
        } else if name.ends_with("token_embedding.weight") {
            0.02
        } else if name.ends_with("position_embedding.weight") {
            if name.starts_with("vision_model") {
                w
            } else {
                0.01
            }
        } else if name.ends_with("class_embedding") {
            w
        } else if name.contains("self_attn.out_proj") || name.contains("mlp.fc2") {
            proj_std
        } else if name.contains("self_attn.") {
            w
        } else if name.contains("mlp.fc1") {
            ((2 * width) as f64).powf(-0.5)
        } else if name == "text_projection.weight" || name == "visual_projection.weight" {
            w
        } else {
            continue; // layer norms, the patch convolution, logit_scale: as built
        };
        let _ = var.normal_(0.0, std);
    }
}

/// open_clip's `ModifiedResNet` initialisation: attention-pool projections ~ N(0, C^-1/2) (zero
/// biases, as elsewhere here), each bottleneck's last norm at zero so every residual branch starts
/// as the identity; convolutions and the pool's positions as built.
fn resnet_init(name: &str, var: &mut Tensor, cfg: &ClipConfig) {
    if name.starts_with("visual.attnpool.") && name.ends_with("_proj.weight") {
        let _ = var.normal_(0.0, (cfg.vision.resnet_channels() as f64).powf(-0.5));
    } else if (name.starts_with("visual.attnpool.") && name.ends_with("_proj.bias"))
        || (name.starts_with("visual.layer") && name.ends_with(".bn3.weight"))
    {
        let _ = var.zero_();
    }
}
