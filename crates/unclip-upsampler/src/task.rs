//! `train-upsampler`: an upsampler trained on image shards — each batch's images at the target
//! resolution, their conditioning brought down and corrupted (`upsampler.low_res`), both cut to
//! the same random crop (SPEC: a quarter of the target side) — with the hybrid loss, and grids of
//! held-out images upsampled whole from their clean low-resolution versions, scored by PSNR
//! beside plain bicubic upsampling.

use std::path::PathBuf;

use anyhow::{anyhow, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};
use unclip_data::images::{Crop, ImageTransform, Normalize};
use unclip_data::loader::{
    sample_seed, DataPosition, ImageBatch, ImageLoader, LoaderConfig, Restartable,
};
use unclip_data::reader::ReaderConfig;
use unclip_decoder::task::tile_rows;
use unclip_diffusion::gaussian::loss_per_quarter;
use unclip_diffusion::{
    ClipDenoised, DiffusionConfig, GaussianDiffusion, LossType, MeanType, Respacing, SamplerConfig,
    SamplerName, VarianceType,
};
use unclip_train::config::{check_init_from, Validate};
use unclip_train::{StepOutput, TrainTask};

use crate::config::UpsamplerModelConfig;
use crate::low_res::{downsample, upsample_condition, LowResConfig};
use crate::model::Upsampler;
use crate::sample::UpsamplerSampler;

/// The `upsampler:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsamplerSection {
    pub model: UpsamplerModelConfig,
    /// Start from a diffusers `UNet2DModel` directory, or a UnCLIP pipeline directory's
    /// `super_res_first/` (e.g. Karlo's), instead of a random initialisation; `model` must
    /// describe the same network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Default: cosine schedule (the 64→256 stage; the 256→1024 one is linear), 1000 steps, ε
    /// with learned-range variances, hybrid loss.
    #[serde(default = "default_diffusion")]
    pub diffusion: DiffusionConfig,
    /// Default: DDIM over 27 respaced steps (the paper's 64→256 count; 15 for 256→1024).
    #[serde(default = "default_sampling")]
    pub sampling: SamplerConfig,
    pub low_res: LowResConfig,
    /// Side of the random training crops, at the high resolution (SPEC: a quarter of the target
    /// side); absent: whole images. Sampling always runs on whole images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<u32>,
    /// As `decoder.gradient_checkpointing`: recompute the UNet blocks' activations in backward.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

pub fn default_diffusion() -> DiffusionConfig {
    DiffusionConfig {
        predict: MeanType::Epsilon,
        variance: VarianceType::LearnedRange,
        loss: LossType::Hybrid,
        ..DiffusionConfig::default()
    }
}

pub fn default_sampling() -> SamplerConfig {
    SamplerConfig {
        sampler: SamplerName::Ddim,
        steps: Respacing::Spec("ddim27".into()),
        eta: None,
        clip: ClipDenoised::Static(1.0),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsamplerDataConfig {
    /// Image shards (brace-expanded).
    pub train: String,
    /// Held-out image shards: the grids upsample their first `samples.count` images.
    pub held_out: String,
    /// The target (high) resolution, crop, flip. Pixels are in [-1, 1].
    #[serde(default = "default_image")]
    pub image: ImageTransform,
    #[serde(default = "yes")]
    pub shard_shuffle: bool,
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Reader threads per rank.
    #[serde(default = "one")]
    pub workers: usize,
}

fn default_image() -> ImageTransform {
    ImageTransform {
        resolution: 256,
        crop: Crop::Center,
        random_flip: true,
        ..ImageTransform::default()
    }
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_shuffle_buffer() -> usize {
    1000
}
fn default_prefetch() -> usize {
    4
}

/// The `samples:` section: what the grids every `logging.images_every` steps show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpsampleGridConfig {
    /// Held-out images (the first ones, in file order): one column each.
    pub count: usize,
    /// Seed of the sampling noise, the same for every grid.
    pub seed: i64,
}

impl Default for UpsampleGridConfig {
    fn default() -> Self {
        Self { count: 8, seed: 0 }
    }
}

/// The task's sections of a `train-upsampler` config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsamplerTrainConfig {
    pub upsampler: UpsamplerSection,
    pub data: UpsamplerDataConfig,
    #[serde(default)]
    pub samples: UpsampleGridConfig,
}

impl UpsamplerTrainConfig {
    /// The target side.
    pub fn resolution(&self) -> u32 {
        self.data.image.resolution
    }

    /// The side training crops have.
    pub fn train_side(&self) -> u32 {
        self.upsampler.crop.unwrap_or(self.resolution())
    }
}

impl Validate for UpsamplerTrainConfig {
    fn validate(&self) -> Result<()> {
        let u = &self.upsampler;
        u.model.validate()?;
        if let Some(dir) = &u.init_from {
            check_init_from(
                "upsampler",
                dir,
                |d| {
                    crate::diffusers::read_diffusers_upsampler_config(
                        &crate::diffusers::upsampler_dir(d)?,
                    )
                },
                &u.model,
            )?;
        }
        u.diffusion
            .validate()
            .map_err(|e| anyhow!("upsampler.diffusion: {e}"))?;
        let want = if u.diffusion.variance == VarianceType::LearnedRange {
            6
        } else {
            3
        };
        ensure!(
            u.model.out_channels == want,
            "upsampler.model.out_channels must be {want} for diffusion.variance {:?}",
            u.diffusion.variance
        );
        u.sampling
            .validate()
            .map_err(|e| anyhow!("upsampler.sampling: {e}"))?;
        u.sampling
            .steps
            .timesteps(u.diffusion.timesteps)
            .map_err(|e| anyhow!("upsampler.sampling.steps: {e}"))?;
        for (key, s) in [
            ("data.train", &self.data.train),
            ("data.held_out", &self.data.held_out),
        ] {
            ensure!(!s.trim().is_empty(), "{key} must name image shards");
        }
        self.data
            .image
            .validate()
            .map_err(|e| anyhow!("data.image: {e}"))?;
        ensure!(
            self.data.image.normalize == Normalize::MinusOneOne,
            "data.image.normalize must be minus_one_one: the upsampler generates pixels in [-1, 1]"
        );
        let high = self.resolution();
        u.low_res.validate(high)?;
        let multiple = 1u32 << u.model.downsamplings();
        ensure!(
            high.is_multiple_of(multiple),
            "data.image.resolution ({high}) must be a multiple of {multiple} for {} UNet levels",
            u.model.block_out_channels.len()
        );
        if let Some(crop) = u.crop {
            ensure!(
                crop >= 1 && crop <= high && crop.is_multiple_of(multiple),
                "upsampler.crop ({crop}) must be at most data.image.resolution ({high}) and a multiple of {multiple} for {} UNet levels",
                u.model.block_out_channels.len()
            );
        }
        ensure!(self.samples.count >= 1, "samples.count must be at least 1");
        Ok(())
    }
}

pub struct UpsamplerBatch {
    /// [B, 3, c, c] crops of the targets, in [-1, 1].
    pub high: Tensor,
    /// [B, 3, c, c]: the same crops of the upsampled, corrupted conditioning.
    pub low: Tensor,
    pub position: DataPosition,
}

/// A grid of held-out images and how close the samples came to them.
pub struct UpsampleReport {
    /// Rows: the low-resolution images upsampled bicubically, the samples, the real images.
    pub grid: Tensor,
    /// Mean PSNR (dB, pixels in [0, 1]) of the samples against the real images.
    pub psnr: f64,
    /// The same for bicubic upsampling of the low-resolution images: the baseline.
    pub psnr_bicubic: f64,
    /// The samples' RMS difference between neighbouring pixels over the real images':
    /// 1 is as sharp as they are, below 1 blurred (PSNR rewards a blur that hedges every edge).
    pub sharpness: f64,
    /// The same for bicubic upsampling.
    pub sharpness_bicubic: f64,
}

impl UpsampleReport {
    pub fn summary(&self) -> String {
        format!(
            "PSNR against the real images: samples {:.2} dB, bicubic upsampling {:.2} dB; \
             sharpness (their pixel-to-pixel contrast over the real images'): samples {:.3}, bicubic {:.3}",
            self.psnr, self.psnr_bicubic, self.sharpness, self.sharpness_bicubic
        )
    }
}

/// Mean over images of the PSNR (dB) between images in [-1, 1].
pub fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure!(
        a.size() == b.size(),
        "PSNR of {:?} and {:?}",
        a.size(),
        b.size()
    );
    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)) / 2.0;
    let mse = diff
        .square()
        .mean_dim([1i64, 2, 3].as_slice(), false, Kind::Double);
    Ok((mse.clamp_min(1e-10).log10() * -10.0)
        .mean(Kind::Double)
        .double_value(&[]))
}

/// Root-mean-square difference between horizontally and vertically neighbouring pixels. Squared,
/// so that spreading an edge over more pixels lowers it (a mean absolute difference keeps the
/// height of a monotone edge however wide it is).
pub fn contrast(images: &Tensor) -> f64 {
    let x = images.to_kind(Kind::Double);
    let (h, w) = (x.size()[2], x.size()[3]);
    let dx = (x.narrow(3, 1, w - 1) - x.narrow(3, 0, w - 1))
        .square()
        .mean(Kind::Double);
    let dy = (x.narrow(2, 1, h - 1) - x.narrow(2, 0, h - 1))
        .square()
        .mean(Kind::Double);
    ((dx + dy) / 2.0).sqrt().double_value(&[])
}

pub struct UpsamplerTask {
    pub model: Upsampler,
    diffusion: GaussianDiffusion,
    loader: ImageLoader,
    loader_cfg: LoaderConfig,
    /// [N, 3, H, W] held-out images, on rank 0.
    held_out: Option<Tensor>,
    cfg: UpsamplerTrainConfig,
    device: Device,
    samples_dir: Option<PathBuf>,
    position: DataPosition,
    skipped_total: u64,
    sample_scalars: Vec<(String, f64)>,
}

fn loader_config(
    cfg: &UpsamplerTrainConfig,
    reader: ReaderConfig,
    batch_size: usize,
) -> LoaderConfig {
    LoaderConfig {
        reader,
        transform: cfg.data.image.clone(),
        batch_size,
        prefetch: cfg.data.prefetch,
        start: DataPosition::default(),
        embeddings: None,
        workers: cfg.data.workers,
    }
}

fn to_tensor(b: &ImageBatch, device: Device) -> Tensor {
    let r = i64::from(b.resolution);
    Tensor::from_slice(&b.images)
        .view([b.len() as i64, 3, r, r])
        .to_device(device)
}

impl UpsamplerTask {
    /// Builds the upsampler at the root of `vs` and starts the data stream for `rank`; rank 0
    /// also reads the held-out images. Grids go to `run_dir/samples` when given.
    pub fn new(
        vs: &nn::VarStore,
        cfg: &UpsamplerTrainConfig,
        seed: u64,
        batch_size: usize,
        rank: usize,
        world_size: usize,
        run_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let device = vs.device();
        let mut model = Upsampler::new(vs.root(), &cfg.upsampler.model)?;
        model
            .unet
            .set_gradient_checkpointing(cfg.upsampler.gradient_checkpointing);
        if let Some(dir) = &cfg.upsampler.init_from {
            crate::diffusers::upsampler_dir(dir)
                .and_then(|d| crate::diffusers::load_diffusers_upsampler_weights(vs, &d))
                .with_context(|| format!("upsampler.init_from {}", dir.display()))?;
        }
        let loader_cfg = loader_config(
            cfg,
            ReaderConfig {
                shards: cfg.data.train.clone(),
                rank,
                world_size,
                seed,
                shard_shuffle: cfg.data.shard_shuffle,
                shuffle_buffer: cfg.data.shuffle_buffer,
            },
            batch_size,
        );
        let loader = ImageLoader::start(loader_cfg.clone())
            .with_context(|| format!("data.train {}", cfg.data.train))?;
        let held_out = if rank == 0 {
            let mut held = ImageLoader::start(LoaderConfig {
                prefetch: 1,
                transform: ImageTransform {
                    random_flip: false,
                    ..cfg.data.image.clone()
                },
                ..loader_config(
                    cfg,
                    ReaderConfig::in_order(cfg.data.held_out.clone()),
                    cfg.samples.count,
                )
            })
            .with_context(|| format!("data.held_out {}", cfg.data.held_out))?;
            let b = held
                .next_batch()
                .with_context(|| format!("data.held_out {}", cfg.data.held_out))?;
            Some(to_tensor(&b, device))
        } else {
            None
        };
        Ok(Self {
            model,
            diffusion: GaussianDiffusion::new(&cfg.upsampler.diffusion)?.to_device(device),
            loader,
            loader_cfg,
            held_out,
            cfg: cfg.clone(),
            device,
            samples_dir: run_dir.filter(|_| rank == 0).map(|d| d.join("samples")),
            position: DataPosition::default(),
            skipped_total: 0,
            sample_scalars: Vec::new(),
        })
    }

    /// A training batch from high-resolution images [B, 3, H, W]: the conditioning corrupted
    /// and upsampled, then both cut to the same random crop — all drawn from `stream` (the
    /// step, micro-batch and rank), so a resumed run sees the same batches.
    pub fn make_batch(&self, high: &Tensor, stream: u64) -> Result<(Tensor, Tensor)> {
        let (b, _, side, _) = high.size4()?;
        let reader = &self.loader_cfg.reader;
        let seed = sample_seed(reader.seed ^ 0x0055_7053_414d_504c, stream, reader.rank, 0);
        let seeds: Vec<u64> = (0..b as u64)
            .map(|i| sample_seed(seed, stream, reader.rank, i + 1))
            .collect();
        let low = self.cfg.upsampler.low_res.corrupted(high, &seeds)?;
        let low = upsample_condition(&low, side).to_device(self.device);
        let crop = i64::from(self.cfg.train_side());
        if crop == side {
            return Ok((high.shallow_clone(), low));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut highs, mut lows) = (Vec::new(), Vec::new());
        for i in 0..b {
            let (y, x) = (
                rng.gen_range(0..=side - crop),
                rng.gen_range(0..=side - crop),
            );
            let window = |t: &Tensor| t.get(i).narrow(1, y, crop).narrow(2, x, crop);
            highs.push(window(high));
            lows.push(window(&low));
        }
        Ok((Tensor::f_stack(&highs, 0)?, Tensor::f_stack(&lows, 0)?))
    }

    /// Upsamples the held-out images from their clean low-resolution versions (seeded noise) and
    /// scores them; None on ranks without the held-out set.
    pub fn sample_held_out(&self) -> Result<Option<UpsampleReport>> {
        let Some(high) = &self.held_out else {
            return Ok(None);
        };
        let _g = tch::no_grad_guard();
        let u = &self.cfg.upsampler;
        let side = high.size()[2];
        let low = downsample(high, i64::from(u.low_res.resolution));
        let bicubic = upsample_condition(&low, side).clamp(-1.0, 1.0);
        let sampler = UpsamplerSampler::new(&self.model, &u.diffusion, &u.sampling)?;
        tch::manual_seed(self.cfg.samples.seed);
        let x = sampler.upsample(&low, high.randn_like())?;
        let real = contrast(high);
        Ok(Some(UpsampleReport {
            psnr: psnr(&x, high)?,
            psnr_bicubic: psnr(&bicubic, high)?,
            sharpness: contrast(&x) / real,
            sharpness_bicubic: contrast(&bicubic) / real,
            grid: tile_rows(&[bicubic, x, high.shallow_clone()])?,
        }))
    }
}

impl TrainTask for UpsamplerTask {
    type Batch = UpsamplerBatch;

    fn next_batch(&mut self, step: u64, micro: usize) -> Result<UpsamplerBatch> {
        let b = self.loader.next_batch()?;
        self.skipped_total = b.skipped_total;
        for r in &b.finished_epochs {
            eprintln!("{}", r.message(self.loader_cfg.reader.rank));
        }
        let high = to_tensor(&b, self.device);
        let (high, low) = self.make_batch(&high, (step << 16) | micro as u64)?;
        Ok(UpsamplerBatch {
            high,
            low,
            position: b.position,
        })
    }

    fn loss(&mut self, batch: &UpsamplerBatch) -> Result<StepOutput> {
        let x0 = &batch.high;
        let b = x0.size()[0];
        let t = self.diffusion.sample_timesteps(b, self.device);
        let noise = x0.randn_like();
        let x_t = self.diffusion.q_sample(x0, &t, &noise)?;
        let out = self.model.forward_t(&x_t, &batch.low, &t, true)?;
        let losses = self.diffusion.training_losses(&out, x0, &x_t, &t, &noise)?;
        self.position = batch.position;
        let mut metrics = loss_per_quarter(&losses.loss, &t, self.diffusion.num_timesteps())?;
        metrics.push(("data_skipped".into(), self.skipped_total as f64));
        Ok(StepOutput {
            loss: losses.loss.mean(Kind::Float),
            samples: b as usize,
            metrics,
        })
    }

    fn images(&mut self, step: u64) -> Result<Vec<(String, Tensor)>> {
        let Some(report) = self.sample_held_out()? else {
            return Ok(Vec::new());
        };
        eprintln!("samples step {step}: {}", report.summary());
        self.sample_scalars = vec![
            ("samples/psnr".into(), report.psnr),
            ("samples/psnr_bicubic".into(), report.psnr_bicubic),
            ("samples/sharpness".into(), report.sharpness),
            ("samples/sharpness_bicubic".into(), report.sharpness_bicubic),
        ];
        if let Some(dir) = &self.samples_dir {
            unclip_train::logging::write_png(
                &dir.join(format!("step_{step:06}.png")),
                &report.grid,
            )?;
        }
        Ok(vec![("samples/held_out".into(), report.grid)])
    }

    fn sample_scalars(&mut self) -> Vec<(String, f64)> {
        std::mem::take(&mut self.sample_scalars)
    }

    fn data_state(&self) -> serde_json::Value {
        self.position.to_state()
    }

    fn restore_data_state(&mut self, state: &serde_json::Value) -> Result<()> {
        if let Some((loader, position)) = ImageLoader::resume(&self.loader_cfg, state)? {
            self.loader = loader;
            self.position = position;
        }
        Ok(())
    }
}
