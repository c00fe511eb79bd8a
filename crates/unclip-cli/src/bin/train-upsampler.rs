//! Train one of unCLIP's diffusion upsamplers (64→256 or 256→1024) on image shards.
//!
//!     train-upsampler --config configs/shapes/upsampler.yaml

use anyhow::Result;
use clap::Parser;
use tch::nn;
use unclip_train::cli::{
    print_dry_run_header, print_model_parameters, train_and_report, write_final_grid, InferenceArgs,
};
use unclip_train::{load_config, TrainArgs};
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

fn export_diffusers(cli: &Cli, out: &std::path::Path) -> Result<()> {
    let args = &cli.args;
    let cfg = load_config::<UpsamplerTrainConfig>(&args.config, &args.overrides)?.task;
    let vs = nn::VarStore::new(tch::Device::Cpu);
    Upsampler::new(vs.root(), &cfg.upsampler.model)?;
    let (weights, source) = cli.inference.weights(args)?;
    unclip_train::trainer::load_into(&vs, &weights, &source)?;
    save_diffusers_upsampler(&vs, &cfg.upsampler.model, i64::from(cfg.resolution()), out)?;
    println!("{source} -> {} (UNet2DModel)", out.display());
    Ok(())
}

fn grid(cli: &Cli, out: &std::path::Path) -> Result<()> {
    let args = &cli.args;
    let cfg = load_config::<UpsamplerTrainConfig>(&args.config, &args.overrides)?;
    let device = cfg.runtime.device()?;
    let (weights, source) = cli.inference.weights(args)?;
    let vs = nn::VarStore::new(device);
    let task = UpsamplerTask::new(&vs, &cfg.task, cfg.runtime.seed, 1, 0, 1, None)?;
    unclip_train::trainer::load_into(&vs, &weights, &source)?;
    if let Some(report) = task.sample_held_out()? {
        unclip_train::logging::write_png(out, &report.grid)?;
        println!("{source}: {}", report.summary());
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn dry_run(cfg: &UpsamplerTrainConfig, device: tch::Device) -> Result<()> {
    let m = &cfg.upsampler.model;
    print_model_parameters(device, &[("unet", m.parameter_count())], |p| {
        Upsampler::new(p, m).map(drop)
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
    let cfg = load_config::<UpsamplerTrainConfig>(&args.config, &args.overrides)?;
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
            UpsamplerTask::new(
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
                println!("held-out upsamplings, {which}: {}", report.summary());
                println!(
                    "  grid (bicubic upsampling, samples, real images): {}",
                    file.display()
                );
            }
            Ok(())
        },
    )
}
