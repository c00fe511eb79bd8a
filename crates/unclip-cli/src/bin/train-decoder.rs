//! Train unCLIP's 64×64 decoder on image shards with their CLIP embeddings.
//!
//!     train-decoder --config configs/shapes/decoder.yaml

use std::path::Path;

use anyhow::Result;
use clap::Parser;
use tch::{nn, Tensor};
use unclip_decoder::task::{DecoderTask, DecoderTrainConfig};
use unclip_decoder::UnclipDecoder;
use unclip_train::cli::{image_trainer_main, ImageTrainer, InferenceArgs, NewTask};
use unclip_train::TrainArgs;

#[derive(Parser)]
#[command(
    about = "Train unCLIP's CLIP-conditioned 64×64 decoder (diffusers UnCLIP decoder layout)",
    long_about = "Train unCLIP's CLIP-conditioned 64×64 decoder (diffusers UnCLIP decoder layout).\n\n\
        --grid: real held-out images, then a row per samples.guidance_scales and per \
        samples.denoise_strengths; prints the CLIP score and, on shapes scenes, the shape counts. \
        --export-diffusers: the UnCLIP pipeline's decoder/ and text_proj/."
)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
    #[command(flatten)]
    inference: InferenceArgs,
}

struct Decoder;

impl ImageTrainer for Decoder {
    type Config = DecoderTrainConfig;
    type Task = DecoderTask;
    const GRID_NAME: &'static str = "held-out samples";
    const GRID_ROWS: &'static str = "real images, then one row per guidance scale";
    const NEW_TASK: NewTask<Self::Config, Self::Task> = DecoderTask::new;

    fn held_out_grid(task: &DecoderTask) -> Result<Option<(Tensor, String)>> {
        Ok(task
            .sample_held_out()?
            .map(|r| (r.grid.shallow_clone(), r.summary())))
    }

    fn build(p: nn::Path, cfg: &DecoderTrainConfig) -> Result<()> {
        UnclipDecoder::from_config(p, &cfg.decoder.model).map(drop)
    }

    fn counted(cfg: &DecoderTrainConfig) -> Vec<(&'static str, i64)> {
        let m = &cfg.decoder.model;
        vec![
            ("decoder", m.unet.parameter_count()),
            ("text_proj", m.text_proj_parameter_count()),
        ]
    }

    fn export(vs: &nn::VarStore, cfg: &DecoderTrainConfig, out: &Path) -> Result<String> {
        let size = cfg.data.image.resolution as i64;
        unclip_decoder::save_diffusers_decoder(vs, &cfg.decoder.model, size, out)?;
        Ok("decoder/, text_proj/".into())
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    image_trainer_main::<Decoder>(&cli.args, &cli.inference)
}
