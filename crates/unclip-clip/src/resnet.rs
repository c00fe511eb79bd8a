//! CLIP's ResNet image encoder (`ModifiedResNet` in OpenAI's CLIP and open_clip): a three-conv
//! stem with an average pool, bottleneck stages that downsample by average pooling (anti-aliased
//! strides), and an attention pool whose query is the mean of the final feature map. Module paths
//! are open_clip's (`visual.conv1.weight`, `visual.layer1.0.bn3.running_var`,
//! `visual.attnpool.c_proj.weight`, …), so its RN50-style state dicts load with no mapping (less
//! `num_batches_tracked`).
//!
//! Convolutions see local structure with translation equivariance built in, which a ViT has to
//! learn from data: on the shapes dataset this tower learns objects' shapes within the CPU budget
//! where the tiny ViT learns only their colours (README, CLIP).

use anyhow::{bail, Result};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use crate::config::VisionConfig;

/// A bias-free k×k convolution padded to keep the size (before the stride).
fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        cin,
        cout,
        k,
        nn::ConvConfig {
            stride,
            padding: k / 2,
            bias: false,
            ..Default::default()
        },
    )
}

/// PyTorch's BatchNorm2d start (weight 1, bias 0; tch draws the weight uniformly).
fn batch_norm(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(
        p,
        c,
        nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.0),
            ..Default::default()
        },
    )
}

fn avg_pool(x: &Tensor, k: i64) -> Tensor {
    if k == 1 {
        x.shallow_clone()
    } else {
        x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>)
    }
}

#[derive(Debug)]
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv3: nn::Conv2D,
    bn3: nn::BatchNorm,
    /// open_clip's `downsample` Sequential: `-1` the average pool, `0` a 1×1 conv, `1` a norm.
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
    stride: i64,
}

impl Bottleneck {
    const EXPANSION: i64 = 4;

    fn new(p: nn::Path, inplanes: i64, planes: i64, stride: i64) -> Self {
        let out = planes * Self::EXPANSION;
        let downsample = (stride > 1 || inplanes != out).then(|| {
            let d = &p / "downsample";
            (
                conv(&d / "0", inplanes, out, 1, 1),
                batch_norm(&d / "1", out),
            )
        });
        Self {
            conv1: conv(&p / "conv1", inplanes, planes, 1, 1),
            bn1: batch_norm(&p / "bn1", planes),
            conv2: conv(&p / "conv2", planes, planes, 3, 1),
            bn2: batch_norm(&p / "bn2", planes),
            conv3: conv(&p / "conv3", planes, out, 1, 1),
            bn3: batch_norm(&p / "bn3", out),
            downsample,
            stride,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let h = self.bn1.forward_t(&self.conv1.forward(x), train).relu();
        let h = self.bn2.forward_t(&self.conv2.forward(&h), train).relu();
        let h = avg_pool(&h, self.stride);
        let h = self.bn3.forward_t(&self.conv3.forward(&h), train);
        let identity = match &self.downsample {
            Some((c, bn)) => bn.forward_t(&c.forward(&avg_pool(x, self.stride)), train),
            None => x.shallow_clone(),
        };
        (h + identity).relu()
    }
}

/// Multi-head attention of the feature map's mean (plus a learned position) over the mean and
/// every position, then `c_proj` into the embedding space. Not the shared `MultiHeadAttention`:
/// its fused k/v projection rounds differently, and the shapes run's figures are those of this
/// arithmetic (the same run through it ended 2 points lower — rounding noise, but not the run the
/// README shows).
#[derive(Debug)]
struct AttentionPool {
    positional_embedding: Tensor,
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    c_proj: nn::Linear,
    heads: i64,
}

impl AttentionPool {
    fn new(p: nn::Path, spatial: i64, dim: i64, heads: i64, out: i64) -> Self {
        let std = (dim as f64).powf(-0.5);
        Self {
            positional_embedding: p.var(
                "positional_embedding",
                &[spatial * spatial + 1, dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            ),
            q_proj: nn::linear(&p / "q_proj", dim, dim, Default::default()),
            k_proj: nn::linear(&p / "k_proj", dim, dim, Default::default()),
            v_proj: nn::linear(&p / "v_proj", dim, dim, Default::default()),
            c_proj: nn::linear(&p / "c_proj", dim, out, Default::default()),
            heads,
        }
    }

    /// x: [B, C, H, W] → [B, out].
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c) = (x.size()[0], x.size()[1]);
        let tokens = x.flatten(2, 3).transpose(1, 2); // [B, HW, C]
        let tokens = Tensor::cat(&[tokens.mean_dim(1, true, None), tokens], 1)
            + self.positional_embedding.to_kind(x.kind());
        let d = c / self.heads;
        let heads = |t: Tensor| t.view([b, -1, self.heads, d]).transpose(1, 2);
        let q = heads(self.q_proj.forward(&tokens.narrow(1, 0, 1)));
        let k = heads(self.k_proj.forward(&tokens));
        let v = heads(self.v_proj.forward(&tokens));
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.c_proj.forward(&out.transpose(1, 2).reshape([b, c]))
    }
}

/// CLIP's `ModifiedResNet`; its output is already the (unnormalised) image embedding.
#[derive(Debug)]
pub struct ModifiedResNet {
    stem: Vec<(nn::Conv2D, nn::BatchNorm)>,
    /// Every stage's bottlenecks in order (`visual.layerS.J`).
    blocks: Vec<Bottleneck>,
    attnpool: AttentionPool,
    image_size: i64,
}

impl ModifiedResNet {
    /// `v.resnet_layers` bottlenecks per stage, base width `v.width` (the stem ends at `width`,
    /// stage i has `width·2^i` planes and `4·width·2^i` outputs), `v.heads` attention-pool heads.
    pub fn new(p: nn::Path, v: &VisionConfig, embed_dim: i64) -> Result<Self> {
        let w = v.width;
        let stem_channels = [(3, w / 2, 2), (w / 2, w / 2, 1), (w / 2, w, 1)];
        let stem = stem_channels
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout, stride))| {
                (
                    conv(&p / format!("conv{}", i + 1), cin, cout, 3, stride),
                    batch_norm(&p / format!("bn{}", i + 1), cout),
                )
            })
            .collect();
        let mut inplanes = w;
        let mut blocks = Vec::new();
        for (i, &count) in v.resnet_layers.iter().enumerate() {
            let planes = w << i;
            let stage = &p / format!("layer{}", i + 1);
            for j in 0..count {
                // Every stage but the first halves the size in its first block.
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                blocks.push(Bottleneck::new(&stage / j, inplanes, planes, stride));
                inplanes = planes * Bottleneck::EXPANSION;
            }
        }
        let spatial = v.image_size / v.resnet_downsampling();
        Ok(Self {
            stem,
            blocks,
            attnpool: AttentionPool::new(&p / "attnpool", spatial, inplanes, v.heads, embed_dim),
            image_size: v.image_size,
        })
    }

    /// pixels: [B, 3, S, S] → [B, embed_dim]. `train`: batch statistics (and running-average
    /// updates) in the norms, else the running averages.
    pub fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let s = self.image_size;
        let size = pixels.size();
        if size.len() != 4 || size[1] != 3 || size[2] != s || size[3] != s {
            bail!("images must be [B, 3, {s}, {s}], got {size:?}");
        }
        let mut x = pixels.shallow_clone();
        for (c, bn) in &self.stem {
            x = bn.forward_t(&c.forward(&x), train).relu();
        }
        x = avg_pool(&x, 2);
        for block in &self.blocks {
            x = block.forward(&x, train);
        }
        Ok(self.attnpool.forward(&x))
    }
}
