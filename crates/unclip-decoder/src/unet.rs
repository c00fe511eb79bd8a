//! GLIDE's text-conditional ADM UNet as diffusers' UnCLIP decoder builds it: a
//! `UNet2DConditionModel` with `ResnetDownsampleBlock2D` / `SimpleCrossAttnDownBlock2D` down,
//! `UNetMidBlock2DSimpleCrossAttn`, `SimpleCrossAttnUpBlock2D` / `ResnetUpsampleBlock2D` up,
//! scale-shift ResBlocks that resample inside the block, and the identity class embedding through
//! which the CLIP conditioning is added to the timestep embedding. Module paths are diffusers'.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::Tensor;
use unclip_diffusion::nn::checkpoint::{checkpoint_one, Shared};
use unclip_diffusion::nn::init;
use unclip_diffusion::nn::norm_act::group_norm_silu;
use unclip_diffusion::nn::resnet::{ResBlock, ResBlockConfig, Resample, TimeScaleShift};
use unclip_diffusion::nn::timestep::{timestep_embedding, TimestepMlp};

use crate::added_kv_attention::AddedKvAttention;

/// The subset of diffusers' `UNet2DConditionModel` config the UnCLIP decoder uses (same names;
/// the rest of the UnCLIP configuration — scale-shift ResBlocks, identity class embedding,
/// resampling inside ResBlocks — is fixed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    #[serde(default = "three")]
    pub in_channels: i64,
    /// 2 × in_channels for a learned variance.
    #[serde(default = "six")]
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    /// Per level: `ResnetDownsampleBlock2D` or `SimpleCrossAttnDownBlock2D`.
    pub down_block_types: Vec<String>,
    /// Per level, deepest first: `SimpleCrossAttnUpBlock2D` or `ResnetUpsampleBlock2D`.
    pub up_block_types: Vec<String>,
    #[serde(default = "three")]
    pub layers_per_block: i64,
    /// Width of the conditioning sequence (extra CLIP tokens + caption tokens).
    pub cross_attention_dim: i64,
    #[serde(default = "sixty_four")]
    pub attention_head_dim: i64,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: i64,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub dropout: f64,
    /// How the ResBlocks take the timestep embedding: scale-shift, the decoder's always; the
    /// upsamplers' config sets it (not a decoder config key).
    #[serde(skip)]
    pub time_scale_shift: TimeScaleShift,
}

fn three() -> i64 {
    3
}
fn six() -> i64 {
    6
}
fn sixty_four() -> i64 {
    64
}
fn thirty_two() -> i64 {
    32
}
fn norm_eps() -> f64 {
    1e-5
}

impl UNetConfig {
    /// Width of the timestep embedding (4 × the first level's channels).
    pub fn time_embed_dim(&self) -> i64 {
        4 * self.block_out_channels[0]
    }

    /// Checks the decoder's UNet (attention in its mid block).
    pub fn validate(&self) -> Result<()> {
        self.validate_with(true)
    }

    /// `mid_attention`: whether the mid block has attention, whose channels then have to split
    /// into heads like an attention level's.
    pub fn validate_with(&self, mid_attention: bool) -> Result<()> {
        let n = self.block_out_channels.len();
        ensure!(n >= 1, "unet.block_out_channels must not be empty");
        ensure!(
            self.down_block_types.len() == n && self.up_block_types.len() == n,
            "unet.down_block_types and up_block_types need one entry per block_out_channels entry ({n})"
        );
        for t in &self.down_block_types {
            ensure!(
                t == "ResnetDownsampleBlock2D" || t == "SimpleCrossAttnDownBlock2D",
                "unet.down_block_types: {t:?} is not ResnetDownsampleBlock2D or SimpleCrossAttnDownBlock2D"
            );
        }
        for t in &self.up_block_types {
            ensure!(
                t == "ResnetUpsampleBlock2D" || t == "SimpleCrossAttnUpBlock2D",
                "unet.up_block_types: {t:?} is not ResnetUpsampleBlock2D or SimpleCrossAttnUpBlock2D"
            );
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            ensure!(
                c > 0 && c % self.norm_num_groups == 0,
                "unet.block_out_channels: {c} must be a multiple of norm_num_groups ({})",
                self.norm_num_groups
            );
            let attention = self.down_block_types[i] == "SimpleCrossAttnDownBlock2D"
                || self.up_block_types[n - 1 - i] == "SimpleCrossAttnUpBlock2D"
                || (mid_attention && i == n - 1);
            ensure!(
                !attention || (self.attention_head_dim > 0 && c % self.attention_head_dim == 0),
                "unet.block_out_channels: {c} (a level with attention) must be a multiple of attention_head_dim ({})",
                self.attention_head_dim
            );
        }
        ensure!(
            self.layers_per_block >= 1,
            "unet.layers_per_block must be at least 1"
        );
        ensure!(
            self.in_channels >= 1 && self.out_channels >= 1 && self.cross_attention_dim >= 1,
            "unet.in_channels, out_channels and cross_attention_dim must be positive"
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "unet.dropout must be in [0, 1), got {}",
            self.dropout
        );
        Ok(())
    }

    /// The resolution levels as [`UNet::new`] builds them: down levels from the top, then up
    /// levels from the bottom.
    fn level_plans(&self) -> (Vec<LevelPlan>, Vec<LevelPlan>) {
        let boc = &self.block_out_channels;
        let last = boc.len() - 1;
        let mut down = Vec::new();
        let mut channels = boc[0];
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let out = boc[i];
            let mut inputs = vec![out; self.layers_per_block as usize];
            inputs[0] = channels;
            down.push(LevelPlan {
                inputs,
                out,
                attention: kind == "SimpleCrossAttnDownBlock2D",
                resample: i != last,
            });
            channels = out;
        }
        let reversed: Vec<i64> = boc.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut prev_out = reversed[0];
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let out = reversed[i];
            let layers = (self.layers_per_block + 1) as usize;
            // Each ResBlock takes the running features concatenated with one skip: the last skip
            // of a level comes from the level below's input width.
            let inputs = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 {
                        reversed[(i + 1).min(last)]
                    } else {
                        out
                    };
                    (if j == 0 { prev_out } else { out }) + skip
                })
                .collect();
            up.push(LevelPlan {
                inputs,
                out,
                attention: kind == "SimpleCrossAttnUpBlock2D",
                resample: i != last,
            });
            prev_out = out;
        }
        (down, up)
    }

    /// How many parameters [`UNet::new`] creates, computed without allocating them (the paper's
    /// decoder would need 10+ GB just to be counted by building it).
    pub fn parameter_count(&self) -> i64 {
        self.parameter_count_with(true)
    }

    /// [`UNetConfig::parameter_count`] with or without the mid block's attention.
    pub fn parameter_count_with(&self, mid_attention: bool) -> i64 {
        let boc = &self.block_out_channels;
        let temb = self.time_embed_dim();
        let linear = |i: i64, o: i64| i * o + o;
        let conv = |i: i64, o: i64, k: i64| i * o * k * k + o;
        let emb_width = match self.time_scale_shift {
            TimeScaleShift::ScaleShift => 2,
            TimeScaleShift::Default => 1,
        };
        let res = |i: i64, o: i64| {
            2 * i
                + conv(i, o, 3)
                + linear(temb, emb_width * o)
                + 2 * o
                + conv(o, o, 3)
                + if i != o { conv(i, o, 1) } else { 0 }
        };
        let attn = |c: i64| {
            2 * c + 3 * linear(c, c) + 2 * linear(self.cross_attention_dim, c) + linear(c, c)
        };
        let (down, up) = self.level_plans();
        let level = |l: &LevelPlan| -> i64 {
            let per_block = l.inputs.iter().map(|&i| res(i, l.out)).sum::<i64>();
            let attention = if l.attention { attn(l.out) } else { 0 };
            let resampler = if l.resample { res(l.out, l.out) } else { 0 };
            per_block + l.inputs.len() as i64 * attention + resampler
        };
        let c = boc[boc.len() - 1];
        conv(self.in_channels, boc[0], 3)
            + linear(boc[0], temb)
            + linear(temb, temb)
            + down.iter().chain(&up).map(level).sum::<i64>()
            + 2 * res(c, c)
            + if mid_attention { attn(c) } else { 0 }
            + 2 * boc[0]
            + conv(boc[0], self.out_channels, 3)
    }
}

/// One resolution level: a ResBlock per entry of `inputs` (its input width) to `out` channels,
/// each followed by attention when `attention`, then a resampling ResBlock when `resample`.
struct LevelPlan {
    inputs: Vec<i64>,
    out: i64,
    attention: bool,
    resample: bool,
}

/// Context handed to every attention block.
struct Cond<'a> {
    context: &'a Tensor,
    mask: Option<&'a Tensor>,
}

/// How a forward pass runs its blocks: `train` turns dropout on; `checkpoint` recomputes each
/// ResBlock's and attention block's activations in backward instead of keeping them.
#[derive(Clone, Copy)]
struct Mode {
    train: bool,
    checkpoint: bool,
}

fn resnet_step(resnet: &Shared<ResBlock>, h: &Tensor, emb: &Tensor, mode: Mode) -> Result<Tensor> {
    let train = mode.train;
    if !mode.checkpoint {
        return Ok(resnet.forward_t(h, Some(emb), train));
    }
    let block = resnet.clone();
    Ok(checkpoint_one(&[h, emb], move |xs: &[Tensor]| {
        Ok::<_, String>(block.forward_t(&xs[0], Some(&xs[1]), train))
    })?)
}

fn attend(
    attn: &Shared<AddedKvAttention>,
    h: &Tensor,
    cond: Option<&Cond>,
    mode: Mode,
) -> Result<Tensor> {
    let Some(cond) = cond else {
        bail!("unet: an attention block needs a context sequence")
    };
    if !mode.checkpoint {
        return attn.forward(h, cond.context, cond.mask);
    }
    let block = attn.clone();
    // The mask is a constant of the batch; the context (from the text projection) is an input.
    let mask = cond.mask.map(Tensor::shallow_clone);
    Ok(checkpoint_one(
        &[h, cond.context],
        move |xs: &[Tensor]| block.forward(&xs[0], &xs[1], mask.as_ref()),
    )?)
}

#[derive(Debug)]
struct Level {
    resnets: Vec<Shared<ResBlock>>,
    attentions: Vec<Shared<AddedKvAttention>>,
    resampler: Option<Shared<ResBlock>>,
}

impl Level {
    fn forward_down(
        &self,
        mut h: Tensor,
        emb: &Tensor,
        cond: Option<&Cond>,
        skips: &mut Vec<Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet_step(resnet, &h, emb, mode)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attend(attn, &h, cond, mode)?;
            }
            skips.push(h.shallow_clone());
        }
        if let Some(down) = &self.resampler {
            h = resnet_step(down, &h, emb, mode)?;
            skips.push(h.shallow_clone());
        }
        Ok(h)
    }

    fn forward_up(
        &self,
        mut h: Tensor,
        emb: &Tensor,
        cond: Option<&Cond>,
        skips: &mut Vec<Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                bail!("unet: ran out of skip connections")
            };
            h = resnet_step(resnet, &Tensor::f_cat(&[&h, &skip], 1)?, emb, mode)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attend(attn, &h, cond, mode)?;
            }
        }
        if let Some(up) = &self.resampler {
            h = resnet_step(up, &h, emb, mode)?;
        }
        Ok(h)
    }
}

#[derive(Debug)]
pub struct UNet {
    conv_in: nn::Conv2D,
    time_embedding: TimestepMlp,
    down: Vec<Level>,
    mid_resnets: Vec<Shared<ResBlock>>,
    /// None in an attention-free UNet (the upsamplers').
    mid_attention: Option<Shared<AddedKvAttention>>,
    up: Vec<Level>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    pub cfg: UNetConfig,
    /// Recompute the blocks' activations in backward (see [`UNet::set_gradient_checkpointing`]).
    gradient_checkpointing: bool,
}

impl UNet {
    /// The decoder's UNet: attention where `down_block_types` / `up_block_types` say, and in the
    /// mid block (`UNetMidBlock2DSimpleCrossAttn`).
    pub fn new(p: nn::Path, cfg: &UNetConfig) -> Result<Self> {
        Self::build(p, cfg, true)
    }

    /// Only convolutions: `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D` levels and a mid
    /// block without attention — diffusers' `UNet2DModel` as the UnCLIP super-resolution stages
    /// configure it (`add_attention: false`). `cross_attention_dim` and `attention_head_dim` are
    /// unused.
    pub fn attention_free(p: nn::Path, cfg: &UNetConfig) -> Result<Self> {
        ensure!(
            cfg.down_block_types.iter().all(|t| t == "ResnetDownsampleBlock2D")
                && cfg.up_block_types.iter().all(|t| t == "ResnetUpsampleBlock2D"),
            "an attention-free UNet has only ResnetDownsampleBlock2D / ResnetUpsampleBlock2D levels"
        );
        Self::build(p, cfg, false)
    }

    fn build(p: nn::Path, cfg: &UNetConfig, mid_attention: bool) -> Result<Self> {
        cfg.validate_with(mid_attention)?;
        let boc = &cfg.block_out_channels;
        let temb = cfg.time_embed_dim();
        let conv3 = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let res = |p: nn::Path, i: i64, o: i64, resample: Resample| {
            Shared::new(ResBlock::new(
                p,
                &ResBlockConfig {
                    groups: cfg.norm_num_groups,
                    eps: cfg.norm_eps,
                    dropout: cfg.dropout,
                    resample,
                    time_scale_shift: cfg.time_scale_shift,
                    ..ResBlockConfig::new(i, o, temb)
                },
            ))
        };
        let attn = |p: nn::Path, c: i64| {
            AddedKvAttention::new(
                p,
                c,
                c / cfg.attention_head_dim,
                cfg.attention_head_dim,
                cfg.cross_attention_dim,
                cfg.norm_num_groups,
            )
            .map(Shared::new)
        };
        let level =
            |bp: nn::Path, plan: &LevelPlan, resampler: (&str, Resample)| -> Result<Level> {
                let mut resnets = Vec::new();
                let mut attentions = Vec::new();
                for (j, &inp) in plan.inputs.iter().enumerate() {
                    resnets.push(res(
                        &bp / "resnets" / j as i64,
                        inp,
                        plan.out,
                        Resample::None,
                    ));
                    if plan.attention {
                        attentions.push(attn(&bp / "attentions" / j as i64, plan.out)?);
                    }
                }
                let (name, r) = resampler;
                Ok(Level {
                    resnets,
                    attentions,
                    resampler: plan
                        .resample
                        .then(|| res(&bp / name / 0, plan.out, plan.out, r)),
                })
            };
        let (down_plan, up_plan) = cfg.level_plans();
        let down = down_plan
            .iter()
            .enumerate()
            .map(|(i, plan)| {
                level(
                    &p / "down_blocks" / i as i64,
                    plan,
                    ("downsamplers", Resample::Down),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid = &p / "mid_block";
        let c = boc[boc.len() - 1];
        let mid_resnets = vec![
            res(&mid / "resnets" / 0, c, c, Resample::None),
            res(&mid / "resnets" / 1, c, c, Resample::None),
        ];
        let mid_attention = if mid_attention {
            Some(attn(&mid / "attentions" / 0, c)?)
        } else {
            None
        };
        let up = up_plan
            .iter()
            .enumerate()
            .map(|(i, plan)| {
                level(
                    &p / "up_blocks" / i as i64,
                    plan,
                    ("upsamplers", Resample::Up),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: init::conv2d(&p / "conv_in", cfg.in_channels, boc[0], 3, conv3),
            time_embedding: TimestepMlp::with_hidden(&p / "time_embedding", boc[0], temb, temb),
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: nn::group_norm(
                &p / "conv_norm_out",
                cfg.norm_num_groups,
                boc[0],
                nn::GroupNormConfig {
                    eps: cfg.norm_eps,
                    ..Default::default()
                },
            ),
            conv_out: init::conv2d(&p / "conv_out", boc[0], cfg.out_channels, 3, conv3),
            cfg: cfg.clone(),
            gradient_checkpointing: false,
        })
    }

    /// With `on`, training forward passes keep only each ResBlock's and attention block's inputs
    /// and recompute the rest in backward (diffusers' `enable_gradient_checkpointing`): the
    /// activations' memory for about one more forward pass. Gradients are unchanged.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    pub fn device(&self) -> tch::Device {
        self.conv_in.ws.device()
    }

    /// x: [B, in, H, W]; t: [B] training timesteps; class_emb: [B, time_embed_dim] added to the
    /// timestep embedding (the CLIP conditioning); context: [B, S, cross_attention_dim];
    /// context_mask: [B, S] bool (true = real token). Returns [B, out, H, W].
    pub fn forward_t(
        &self,
        x: &Tensor,
        t: &Tensor,
        class_emb: &Tensor,
        context: &Tensor,
        context_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let cond = Cond {
            context,
            mask: context_mask,
        };
        self.run(x, t, Some(class_emb), Some(&cond), train)
    }

    /// An attention-free UNet's forward pass: x [B, in, H, W], t [B] → [B, out, H, W].
    pub fn forward_unconditional(&self, x: &Tensor, t: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, t, None, None, train)
    }

    fn run(
        &self,
        x: &Tensor,
        t: &Tensor,
        class_emb: Option<&Tensor>,
        cond: Option<&Cond>,
        train: bool,
    ) -> Result<Tensor> {
        let levels = self.cfg.block_out_channels.len() as i64 - 1;
        let (h, w) = (x.size()[2], x.size()[3]);
        ensure!(
            h % (1 << levels) == 0 && w % (1 << levels) == 0,
            "unet input {:?}: height and width must be multiples of {}",
            x.size(),
            1 << levels
        );
        let temb = timestep_embedding(t, self.cfg.block_out_channels[0], 10_000.0)?
            .to_device(x.device())
            .to_kind(x.kind());
        let emb = self.time_embedding.forward(&temb);
        let emb = match class_emb {
            Some(c) => emb + c,
            None => emb,
        };
        let mode = Mode {
            train,
            checkpoint: train && self.gradient_checkpointing,
        };
        let mut h = self.conv_in.forward(x);
        let mut skips = vec![h.shallow_clone()];
        for level in &self.down {
            h = level.forward_down(h, &emb, cond, &mut skips, mode)?;
        }
        h = resnet_step(&self.mid_resnets[0], &h, &emb, mode)?;
        if let Some(attn) = &self.mid_attention {
            h = attend(attn, &h, cond, mode)?;
        }
        h = resnet_step(&self.mid_resnets[1], &h, &emb, mode)?;
        for level in &self.up {
            h = level.forward_up(h, &emb, cond, &mut skips, mode)?;
        }
        ensure!(
            skips.is_empty(),
            "unet: {} skip connections unused",
            skips.len()
        );
        let h = group_norm_silu(&self.conv_norm_out, self.cfg.norm_eps, &h);
        Ok(self.conv_out.forward(&h))
    }
}
