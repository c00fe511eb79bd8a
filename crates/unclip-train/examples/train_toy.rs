//! The 2-D diffusion toy through the whole runtime: config + `--set`, `--dry-run`, training with
//! checkpoints and TensorBoard logs, `--resume auto`, then sampling with the EMA weights and a
//! score against the known data distribution.
//!
//!     cargo run -p unclip-train --example train_toy -- --config configs/toy/toy2d.yaml

use anyhow::{Context, Result};
use clap::Parser;
use tch::{nn, Kind, Tensor};
use unclip_diffusion::device::parse_device;
use unclip_train::checkpoint;
use unclip_train::toy::{ToyConfig, ToyTask};
use unclip_train::trainer::{load_into, parameter_summary};
use unclip_train::{load_config, train, TrainArgs};

#[derive(Parser)]
#[command(about = "Train the 2-D diffusion toy through the unCLIP training runtime")]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
    /// Samples drawn from the EMA model at the end.
    #[arg(long, default_value_t = 4096)]
    samples: i64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let args = &cli.args;
    let cfg = load_config::<ToyConfig>(&args.config, &args.overrides)?;
    let device = parse_device(&cfg.runtime.device)?;
    tch::manual_seed(cfg.runtime.seed as i64);
    let vs = nn::VarStore::new(device);
    let mut task = ToyTask::new(&vs, &cfg.task, cfg.runtime.train.batch_size)?;
    let total: i64 = parameter_summary(&vs).iter().map(|(_, n)| n).sum();
    if args.dry_run {
        println!(
            "config {} is valid; device {device:?}",
            args.config.display()
        );
        for (module, n) in parameter_summary(&vs) {
            println!("  {module:<20} {n:>12} parameters");
        }
        println!("  {:<20} {total:>12} parameters", "total");
        return Ok(());
    }
    let run_dir = args.run_dir();
    let rank0 = unclip_dist::DistEnv::from_env()?.is_none_or(|e| e.rank == 0);
    if rank0 {
        println!(
            "run directory {} ({total} parameters, device {device:?})",
            run_dir.display()
        );
    }
    let summary = train(
        &mut task,
        &vs,
        &cfg.runtime,
        &cfg.resolved,
        &run_dir,
        args.resume.as_deref(),
    )?;
    if summary.rank != 0 {
        return Ok(()); // rank 0 reports and samples
    }
    let n = summary.losses.len().min(100);
    if n > 0 {
        let tail = summary.losses[summary.losses.len() - n..]
            .iter()
            .map(|l| l.1)
            .sum::<f64>()
            / n as f64;
        println!(
            "trained to step {}; mean loss of the last {n} steps {tail:.4}",
            summary.final_step
        );
    }

    let Some(sampling) = &cfg.task.sampling else {
        return Ok(());
    };
    let ckpt = summary
        .last_checkpoint
        .or(summary.resumed_from)
        .context("no checkpoint to sample from")?;
    let ck = checkpoint::load(&ckpt)?;
    if let Some(ema) = &ck.ema {
        load_into(&vs, ema, "EMA weights")?;
    }
    let (sampler, kind) = sampling.build(&cfg.task.diffusion)?;
    let sampler = sampler.to_device(device);
    let noise = Tensor::randn([cli.samples, 2], (Kind::Float, device));
    let x = sampler.sample(
        kind,
        &sampling.clip,
        noise,
        |x: &Tensor, t: &Tensor| task.model.forward(x, t),
        None,
    )?;
    let score = task.data.score(&x);
    let data = task.data.score(&task.data.sample(cli.samples, device));
    println!("{:<34} {:>10} {:>10}", "", "distance", "near mode");
    println!(
        "{:<34} {:>10.4} {:>10.3}",
        "data itself", data.mean_distance, data.near_fraction
    );
    let label = format!("EMA model, {kind:?}, {} steps", sampler.num_timesteps());
    println!(
        "{label:<34} {:>10.4} {:>10.3}",
        score.mean_distance, score.near_fraction
    );
    println!(
        "TensorBoard logs: {}",
        run_dir.join("tensorboard").display()
    );
    Ok(())
}
