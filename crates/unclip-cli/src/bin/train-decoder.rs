//! Train unCLIP's 64×64 decoder on image shards with their CLIP embeddings.
//!
//!     train-decoder --config configs/shapes/decoder.yaml

use std::collections::HashMap;

use anyhow::{ensure, Result};
use clap::Parser;
use tch::nn;
use unclip_decoder::task::{DecoderTask, DecoderTrainConfig};
use unclip_decoder::UnclipDecoder;
use unclip_train::cli::{
    print_dry_run_header, print_model_parameters, train_and_report, write_final_grid,
};
use unclip_train::{load_config, TrainArgs};

#[derive(Parser)]
#[command(
    about = "Train unCLIP's CLIP-conditioned 64×64 decoder (diffusers UnCLIP decoder layout)"
)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
    /// Instead of training: decode the held-out image embeddings with the run's newest checkpoint
    /// (EMA weights) and write the grid (real images, one row per `samples.guidance_scales`, then
    /// per `samples.denoise_strengths` and scale) to this PNG file, printing the CLIP score and on
    /// shapes scenes the shape counts. `--set decoder.sampling...` picks the sampler.
    #[arg(long, value_name = "FILE.png")]
    grid: Option<std::path::PathBuf>,
    /// Instead of training: write the run's newest checkpoint (EMA weights) as a diffusers UnCLIP
    /// pipeline's `decoder/` and `text_proj/` (config.json + safetensors) into this directory.
    #[arg(long, value_name = "DIR", conflicts_with = "grid")]
    export_diffusers: Option<std::path::PathBuf>,
    /// With --grid or --export-diffusers: this checkpoint directory (`RUN/checkpoints/step-N`)
    /// instead of the run's newest.
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<std::path::PathBuf>,
}

/// The weights --grid and --export-diffusers use: --checkpoint's, else the run's newest
/// checkpoint's (EMA weights when it has them), with a description for messages.
fn inference_weights(cli: &Cli) -> Result<(HashMap<String, tch::Tensor>, String)> {
    unclip_train::checkpoint::run_weights(&cli.args.run_dir(), cli.checkpoint.as_deref())
}

fn export_diffusers(cli: &Cli, out: &std::path::Path) -> Result<()> {
    let args = &cli.args;
    let cfg = load_config::<DecoderTrainConfig>(&args.config, &args.overrides)?.task;
    let vs = nn::VarStore::new(tch::Device::Cpu);
    UnclipDecoder::from_config(vs.root(), &cfg.decoder.model)?;
    let (weights, source) = inference_weights(cli)?;
    unclip_train::trainer::load_into(&vs, &weights, &source)?;
    let size = cfg.data.image.resolution as i64;
    unclip_decoder::save_diffusers_decoder(&vs, &cfg.decoder.model, size, out)?;
    println!("{source} -> {} (decoder/, text_proj/)", out.display());
    Ok(())
}

fn grid(cli: &Cli, out: &std::path::Path) -> Result<()> {
    let args = &cli.args;
    let cfg = load_config::<DecoderTrainConfig>(&args.config, &args.overrides)?;
    let device = cfg.runtime.device()?;
    // The weights first: a missing checkpoint fails before the CLIP and held-out set are loaded.
    let (weights, source) = inference_weights(cli)?;
    let vs = nn::VarStore::new(device);
    let task = DecoderTask::new(&vs, &cfg.task, cfg.runtime.seed, 1, 0, 1, None)?;
    unclip_train::trainer::load_into(&vs, &weights, &source)?;
    if let Some(report) = task.sample_held_out()? {
        unclip_train::logging::write_png(out, &report.grid)?;
        println!("{source}: {}", report.summary());
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn dry_run(cfg: &DecoderTrainConfig, device: tch::Device) -> Result<()> {
    let m = &cfg.decoder.model;
    let counted = [
        ("decoder", m.unet.parameter_count()),
        ("text_proj", m.text_proj_parameter_count()),
    ];
    print_model_parameters(device, &counted, |p| {
        UnclipDecoder::from_config(p, m).map(drop)
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(
        cli.checkpoint.is_none() || cli.grid.is_some() || cli.export_diffusers.is_some(),
        "--checkpoint picks the weights of --grid or --export-diffusers; training resumes with --resume"
    );
    if let Some(out) = &cli.grid {
        return grid(&cli, out);
    }
    if let Some(out) = &cli.export_diffusers {
        return export_diffusers(&cli, out);
    }
    let args = &cli.args;
    let cfg = load_config::<DecoderTrainConfig>(&args.config, &args.overrides)?;
    let device = cfg.runtime.device()?;
    if args.dry_run {
        print_dry_run_header(&args.config, &cfg.runtime, device);
        return dry_run(&cfg.task, device);
    }
    let run_dir = args.run_dir();
    train_and_report(
        &cfg,
        args,
        |vs, rank, world| {
            DecoderTask::new(
                vs,
                &cfg.task,
                cfg.runtime.seed,
                cfg.runtime.train.batch_size,
                rank,
                world,
                Some(run_dir.clone()),
            )
        },
        |task, which| {
            if let Some(report) = task.sample_held_out()? {
                let file = write_final_grid(&run_dir, which, &report.grid)?;
                println!("held-out samples, {which}: {}", report.summary());
                println!(
                    "  grid (real images, then one row per guidance scale): {}",
                    file.display()
                );
            }
            Ok(())
        },
    )
}
