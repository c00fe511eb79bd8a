//! The 2-D diffusion toy through the whole runtime: config + `--set`, `--dry-run`, training with
//! checkpoints and TensorBoard logs, `--resume auto`, then sampling with the EMA weights and a
//! score against the known data distribution.
//!
//!     cargo run -p unclip-train --example train_toy -- --config configs/toy/toy2d.yaml

use anyhow::{Context, Result};
use clap::Parser;
use tch::{nn, Kind, Tensor};
use unclip_train::checkpoint;
use unclip_train::cli::{print_dry_run_header, print_parameter_summary, train_with_args};
use unclip_train::toy::{ToyConfig, ToyTask};
use unclip_train::trainer::load_into;
use unclip_train::{load_config, TrainArgs};

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
    let device = cfg.runtime.device()?;
    tch::manual_seed(cfg.runtime.seed as i64);
    let vs = nn::VarStore::new(device);
    let mut task = ToyTask::new(&vs, &cfg.task, cfg.runtime.train.batch_size)?;
    if args.dry_run {
        print_dry_run_header(&args.config, &cfg.runtime, device);
        print_parameter_summary(&vs, &cfg.runtime);
        return Ok(());
    }
    let summary = train_with_args(&mut task, &vs, &cfg, args)?;
    let run_dir = args.run_dir();
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
