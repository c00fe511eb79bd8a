//! Train one of unCLIP's diffusion upsamplers (64→256 or 256→1024) on image shards.
//!
//!     train-upsampler --config configs/shapes/upsampler.yaml

use anyhow::{ensure, Result};
use clap::Parser;
use tch::nn;
use unclip_train::cli::{
    print_dry_run_header, print_model_parameters, train_and_report, write_final_grid,
};
use unclip_train::{load_config, TrainArgs};
use unclip_upsampler::diffusers::save_diffusers_upsampler;
use unclip_upsampler::task::{UpsamplerTask, UpsamplerTrainConfig};
use unclip_upsampler::Upsampler;

#[derive(Parser)]
#[command(about = "Train one of unCLIP's diffusion upsamplers (diffusers UNet2DModel layout)")]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
    /// Instead of training: upsample the held-out images with the run's newest checkpoint (EMA
    /// weights) and write the grid (bicubic upsampling, samples, real images) to this PNG file,
    /// printing the PSNRs. `--set upsampler.sampling...` picks the sampler.
    #[arg(long, value_name = "FILE.png")]
    grid: Option<std::path::PathBuf>,
    /// Instead of training: write the run's newest checkpoint (EMA weights) as a diffusers
    /// `UNet2DModel` directory (config.json + safetensors), the UnCLIP pipeline's `super_res_*`.
    #[arg(long, value_name = "DIR", conflicts_with = "grid")]
    export_diffusers: Option<std::path::PathBuf>,
    /// With --grid or --export-diffusers: this checkpoint directory (`RUN/checkpoints/step-N`)
    /// instead of the run's newest.
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<std::path::PathBuf>,
}

fn export_diffusers(cli: &Cli, out: &std::path::Path) -> Result<()> {
    let args = &cli.args;
    let cfg = load_config::<UpsamplerTrainConfig>(&args.config, &args.overrides)?.task;
    let vs = nn::VarStore::new(tch::Device::Cpu);
    Upsampler::new(vs.root(), &cfg.upsampler.model)?;
    let (weights, source) =
        unclip_train::checkpoint::run_weights(&args.run_dir(), cli.checkpoint.as_deref())?;
    unclip_train::trainer::load_into(&vs, &weights, &source)?;
    save_diffusers_upsampler(&vs, &cfg.upsampler.model, i64::from(cfg.resolution()), out)?;
    println!("{source} -> {} (UNet2DModel)", out.display());
    Ok(())
}

fn grid(cli: &Cli, out: &std::path::Path) -> Result<()> {
    let args = &cli.args;
    let cfg = load_config::<UpsamplerTrainConfig>(&args.config, &args.overrides)?;
    let device = cfg.runtime.device()?;
    let (weights, source) =
        unclip_train::checkpoint::run_weights(&args.run_dir(), cli.checkpoint.as_deref())?;
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
