//! Train the diffusion or the autoregressive prior on embedding shards, or sample image
//! embeddings from a trained one.
//!
//!     train-prior --config configs/shapes/prior.yaml
//!     train-prior --config configs/shapes/prior.yaml --sample "a red circle" --out z.npy
//!     train-prior --config configs/shapes/prior.yaml --export-diffusers runs/prior-diffusers

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use tch::nn;
use unclip_clip::caption::CaptionEncoder;
use unclip_data::npy::NpyArray;
use unclip_prior::load::load_prior_run;
use unclip_prior::prior::describe_sampling;
use unclip_prior::task::{EvalReport, PriorTask, PriorTrainConfig};
use unclip_prior::Prior;
use unclip_train::cli::{
    print_dry_run_header, print_model_parameters, report_current_then_ema, train_with_args,
};
use unclip_train::{load_config, TrainArgs};

#[derive(Parser)]
#[command(
    about = "Train one of unCLIP's priors (CLIP text → CLIP image embedding), diffusion or autoregressive, or sample from a trained one"
)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
    /// Instead of training: sample an image embedding for this caption from the run's newest
    /// checkpoint (EMA weights). Repeatable.
    #[arg(long = "sample", value_name = "CAPTION")]
    sample: Vec<String>,
    /// With --sample: write the embeddings as a float32 [N, D] .npy file.
    #[arg(long, value_name = "FILE.npy")]
    out: Option<PathBuf>,
    /// With --sample: the guidance scale (default: the config's prior.guidance_scale).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// With --sample: candidates per caption (default: the config's prior.candidates).
    #[arg(long)]
    candidates: Option<usize>,
    /// With --sample: sampling keys to change, as YAML — the diffusion prior's sampler (e.g.
    /// '{steps: "32"}') or the autoregressive prior's '{temperature: 0.8, dot_quantile: null}'.
    #[arg(long, value_name = "YAML")]
    sampling: Option<String>,
    /// With --sample: the seed of the sampling noise.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Instead of training: write the run's newest checkpoint (EMA weights) as a diffusers
    /// `PriorTransformer` directory (the diffusion prior; what `prior.init_from` reads).
    #[arg(long, value_name = "DIR", conflicts_with = "sample")]
    export_diffusers: Option<PathBuf>,
    /// With --sample or --export-diffusers: this checkpoint directory (`RUN/checkpoints/step-N`)
    /// instead of the newest (its EMA weights when it has them).
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
}

fn print_report(report: &EvalReport, count: usize, what: &str) {
    println!(
        "held-out ({count} captions, {what}): cosine(z_t, true z_i) baseline {:.4}",
        report.baseline
    );
    if let Some(c) = report.codec_round_trip {
        println!("  cosine(true z_i, z_i through the codec) {c:.4} (the ceiling)");
    }
    for r in &report.rows {
        let manifold = r.manifold.map_or(String::new(), |m| {
            format!("  precision {:.3} recall {:.3}", m.precision, m.recall)
        });
        println!(
            "  guidance {:>4}: cosine(sampled z_i, true z_i) {:.4}  cosine(sampled z_i, z_t) {:.4}{manifold}",
            r.guidance_scale, r.cos_true, r.cos_text
        );
    }
}

fn sample(cli: &Cli) -> Result<()> {
    let run_dir = cli.args.run_dir();
    let cfg = load_config::<PriorTrainConfig>(&cli.args.config, &cli.args.overrides)?;
    let device = cfg.runtime.device()?;
    let run = load_prior_run(&run_dir, cli.checkpoint.as_deref(), device)?;
    let encoder = CaptionEncoder::load_with(&run.cfg.clip, device, run.cfg.prior.clip_embeddings)
        .with_context(|| format!("clip: {}", run.cfg.clip.display()))?;
    unclip_prior::task::check_clip_fits(
        &encoder,
        &run.cfg.prior,
        &run.cfg.clip.display().to_string(),
    )?;
    let text = encoder.encode(&cli.sample)?;
    let null = encoder.null_condition()?;
    let p = &run.cfg.prior;
    let scale = cli.guidance_scale.unwrap_or(p.guidance_scale);
    let candidates = cli.candidates.unwrap_or(p.candidates);
    tch::manual_seed(cli.seed);
    let mut sampling = run.model.sampling(p);
    if let Some(yaml) = &cli.sampling {
        sampling = sampling.with_keys("--sampling", yaml)?;
    }
    let s = run
        .model
        .sample(p, &sampling, &text, &null, scale, candidates)?;
    let how = describe_sampling(&sampling);
    println!(
        "{} ({candidates} candidates each, guidance {scale}, {how})",
        run.source
    );
    let best: Vec<f64> = Vec::try_from(&s.scores.max_dim(1, false).0.to_device(tch::Device::Cpu))?;
    for (caption, score) in cli.sample.iter().zip(best) {
        println!("  {caption:?}: z_i · z_t = {score:.4}");
    }
    if let Some(out) = &cli.out {
        let z = s
            .image_embeds
            .to_kind(tch::Kind::Float)
            .to_device(tch::Device::Cpu);
        let (n, d) = (z.size()[0] as usize, z.size()[1] as usize);
        let values: Vec<f32> = Vec::try_from(&z.flatten(0, -1))?;
        std::fs::write(out, NpyArray::f32(vec![n, d], values).to_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
        println!(
            "wrote {} ([{n}, {d}] float32, {} embeddings)",
            out.display(),
            p.clip_embeddings.name()
        );
    }
    Ok(())
}

fn export(cli: &Cli, out: &std::path::Path) -> Result<()> {
    let device = tch::Device::Cpu;
    let run = load_prior_run(&cli.args.run_dir(), cli.checkpoint.as_deref(), device)?;
    let Prior::Diffusion(_) = &run.model else {
        anyhow::bail!(
            "{}: the autoregressive prior (prior.kind) has no diffusers form",
            run.source
        );
    };
    let model = run.cfg.prior.diffusion_model()?;
    unclip_train::publish::write_into_dir(out, |dir| {
        unclip_prior::load::save_diffusers_prior(&run.vs, model, dir)
    })?;
    println!("{} -> {} (PriorTransformer)", run.source, out.display());
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.checkpoint.is_none() || !cli.sample.is_empty() || cli.export_diffusers.is_some(),
        "--checkpoint picks the weights of --sample or --export-diffusers; training resumes with --resume"
    );
    if !cli.sample.is_empty() {
        return sample(&cli);
    }
    if let Some(out) = &cli.export_diffusers {
        return export(&cli, out);
    }
    let args = &cli.args;
    let cfg = load_config::<PriorTrainConfig>(&args.config, &args.overrides)?;
    let device = cfg.runtime.device()?;
    let env = unclip_dist::DistEnv::from_env()?;
    let (rank, world) = env.as_ref().map_or((0, 1), |e| (e.rank, e.world_size));
    if args.dry_run {
        print_dry_run_header(&args.config, &cfg.runtime, device);
        let prior = &cfg.task.prior;
        return print_model_parameters(
            device,
            &cfg.runtime,
            &[("prior", prior.parameter_count()?)],
            |p| Prior::new(p, prior).map(drop),
        );
    }
    tch::manual_seed(cfg.runtime.seed as i64);
    let vs = nn::VarStore::new(device);
    let mut task = PriorTask::new(
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
    let scales = cfg.task.eval.guidance_scales.clone();
    let count = cfg.task.eval.count;
    let ckpt = report_current_then_ema(&vs, &summary, |which| {
        if let Some(report) = task.evaluate(&scales)? {
            print_report(&report, count, which);
        }
        Ok(())
    })?;
    println!("checkpoint {}", ckpt.display());
    Ok(())
}
