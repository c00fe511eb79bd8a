//! Train unCLIP's 64×64 decoder on image shards with their CLIP embeddings.
//!
//!     train-decoder --config configs/shapes/decoder.yaml

use anyhow::Result;
use clap::Parser;
use tch::nn;
use unclip_decoder::task::{DecoderTask, DecoderTrainConfig};
use unclip_decoder::UnclipDecoder;
use unclip_train::cli::{
    print_dry_run_header, print_model_parameters, train_and_report, write_final_grid, InferenceArgs,
};
use unclip_train::{load_config, TrainArgs};

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

fn export_diffusers(cli: &Cli, out: &std::path::Path) -> Result<()> {
    let args = &cli.args;
    let cfg = load_config::<DecoderTrainConfig>(&args.config, &args.overrides)?.task;
    let vs = nn::VarStore::new(tch::Device::Cpu);
    UnclipDecoder::from_config(vs.root(), &cfg.decoder.model)?;
    let (weights, source) = cli.inference.weights(args)?;
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
    let (weights, source) = cli.inference.weights(args)?;
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
    cli.inference.check()?;
    if let Some(out) = &cli.inference.grid {
        return grid(&cli, out);
    }
    if let Some(out) = &cli.inference.export_diffusers {
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
