//! Train CLIP contrastively on captioned-image shards.
//!
//!     train-clip --config configs/shapes/clip.yaml

use anyhow::Result;
use clap::Parser;
use tch::nn;
use unclip_clip::task::{ensure_shards, ClipTask, ClipTrainConfig};
use unclip_train::cli::{
    print_dry_run_header, print_parameter_summary, report_current_then_ema, train_with_args,
};
use unclip_train::{load_config, TrainArgs};

#[derive(Parser)]
#[command(about = "Train CLIP (ViT image encoder + causal text encoder) with the unCLIP runtime")]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let args = &cli.args;
    let cfg = load_config::<ClipTrainConfig>(&args.config, &args.overrides)?;
    let device = cfg.runtime.device()?;
    let env = unclip_dist::DistEnv::from_env()?;
    let (rank, world) = env.as_ref().map_or((0, 1), |e| (e.rank, e.world_size));
    if args.dry_run {
        let vs = nn::VarStore::new(device);
        let _model = unclip_clip::Clip::new(vs.root(), &cfg.task.model)?;
        print_dry_run_header(&args.config, &cfg.runtime, device);
        print_parameter_summary(&vs, &cfg.runtime);
        return Ok(());
    }
    for set in [&cfg.task.data.train, &cfg.task.data.held_out] {
        if world > 1
            && set.generate.is_some()
            && !unclip_data::reader::is_streamed(&set.shards)
            && unclip_data::reader::shard_list(&set.shards).is_err()
        {
            anyhow::bail!(
                "{} is missing: in multi-process runs write it first (make-shapes), ranks do not generate data",
                set.shards
            );
        }
        ensure_shards(set)?;
    }
    tch::manual_seed(cfg.runtime.seed as i64);
    let vs = nn::VarStore::new(device);
    let mut task = ClipTask::new(
        &vs,
        &cfg.task,
        cfg.runtime.seed,
        cfg.runtime.train.batch_size,
        rank,
        world,
    )?;
    let summary = train_with_args(&mut task, &vs, &cfg, args)?;
    if summary.rank != 0 {
        return Ok(());
    }
    let ckpt = report_current_then_ema(&vs, &summary, |which| {
        let Some(eval) = task.held_out_eval()? else {
            return Ok(());
        };
        let d = &cfg.task.data;
        let groups = match d.held_out_groups {
            1 => String::new(),
            n => format!(", mean of {n} disjoint sets"),
        };
        println!(
            "step {}: held-out top-1 among {}{groups} ({which}): image->text {:.1}%, text->image {:.1}%",
            summary.final_step,
            d.held_out_count,
            eval.i2t * 100.0,
            eval.t2i * 100.0
        );
        if let Some(acc) = eval.hard_negatives {
            println!(
                "step {}: held-out hard negatives ({which}): the caption beats its one-word twin for {:.1}% of the images",
                summary.final_step,
                acc * 100.0
            );
        }
        Ok(())
    })?;
    println!("checkpoint {}", ckpt.display());
    Ok(())
}
