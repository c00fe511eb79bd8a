//! Train one of unCLIP's diffusion upsamplers (64→256 or 256→1024) on image shards.
//!
//!     train-upsampler --config configs/shapes/upsampler.yaml

use std::path::Path;

use anyhow::Result;
use clap::Parser;
use tch::{nn, Tensor};
use unclip_train::cli::{image_trainer_main, ImageTrainer, InferenceArgs, NewTask};
use unclip_train::TrainArgs;
use unclip_upsampler::diffusers::save_diffusers_upsampler;
use unclip_upsampler::task::{UpsamplerTask, UpsamplerTrainConfig};
use unclip_upsampler::Upsampler;

#[derive(Parser)]
#[command(
    about = "Train one of unCLIP's diffusion upsamplers (diffusers UNet2DModel layout)",
    long_about = "Train one of unCLIP's diffusion upsamplers (diffusers UNet2DModel layout).\n\n\
        --grid: bicubic upsampling, samples and real images of the held-out set; prints the PSNRs \
        and sharpness. --export-diffusers: a UNet2DModel directory, the UnCLIP pipeline's \
        super_res_first / super_res_last."
)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
    #[command(flatten)]
    inference: InferenceArgs,
}

struct Upsampling;

impl ImageTrainer for Upsampling {
    type Config = UpsamplerTrainConfig;
    type Task = UpsamplerTask;
    const GRID_NAME: &'static str = "held-out upsamplings";
    const GRID_ROWS: &'static str = "bicubic upsampling, samples, real images";
    const NEW_TASK: NewTask<Self::Config, Self::Task> = UpsamplerTask::new;

    fn held_out_grid(task: &UpsamplerTask) -> Result<Option<(Tensor, String)>> {
        Ok(task
            .sample_held_out()?
            .map(|r| (r.grid.shallow_clone(), r.summary())))
    }

    fn build(p: nn::Path, cfg: &UpsamplerTrainConfig) -> Result<()> {
        Upsampler::new(p, &cfg.upsampler.model).map(drop)
    }

    fn counted(cfg: &UpsamplerTrainConfig) -> Vec<(&'static str, i64)> {
        vec![("unet", cfg.upsampler.model.parameter_count())]
    }

    fn export(vs: &nn::VarStore, cfg: &UpsamplerTrainConfig, out: &Path) -> Result<String> {
        let size = i64::from(cfg.resolution());
        save_diffusers_upsampler(vs, &cfg.upsampler.model, size, out)?;
        Ok("UNet2DModel".into())
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    image_trainer_main::<Upsampling>(&cli.args, &cli.inference)
}
