//! The flags every trainer binary takes.

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// The run config (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config value, e.g. --set train.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Validate the config, build the model, print parameter counts, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Resume from `auto` (the newest complete checkpoint of the run directory) or a checkpoint path.
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
    /// Where checkpoints, logs and the resolved config go (default: runs/<config name>).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
}

impl TrainArgs {
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| {
            let stem = self
                .config
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned());
            PathBuf::from("runs").join(stem.unwrap_or_else(|| "run".into()))
        })
    }
}

/// What a trainer of an image model can do with a run instead of training it.
#[derive(Debug, Clone, Args)]
pub struct InferenceArgs {
    /// Instead of training: sample the held-out set with the run's newest checkpoint (EMA
    /// weights), write the grid a run writes at its end to this PNG file and print its figures.
    /// `--set <model>.sampling...` picks the sampler.
    #[arg(long, value_name = "FILE.png")]
    pub grid: Option<PathBuf>,
    /// Instead of training: write the run's newest checkpoint (EMA weights) in diffusers' layout
    /// (config.json + safetensors per component) into this directory.
    #[arg(long, value_name = "DIR", conflicts_with = "grid")]
    pub export_diffusers: Option<PathBuf>,
    /// With --grid or --export-diffusers: this checkpoint directory (`RUN/checkpoints/step-N`)
    /// instead of the run's newest.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
}

impl InferenceArgs {
    /// `--checkpoint` only picks the weights of `--grid` or `--export-diffusers`.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.checkpoint.is_none() || self.grid.is_some() || self.export_diffusers.is_some(),
            "--checkpoint picks the weights of --grid or --export-diffusers; training resumes with --resume"
        );
        Ok(())
    }

    /// The weights to use: `--checkpoint`'s, else the newest checkpoint's of the run in `args`
    /// (EMA weights when it has them), with a description for messages.
    pub fn weights(
        &self,
        args: &TrainArgs,
    ) -> anyhow::Result<(std::collections::HashMap<String, tch::Tensor>, String)> {
        crate::checkpoint::run_weights(&args.run_dir(), self.checkpoint.as_deref())
    }
}

/// `--dry-run`'s first lines: the config is valid, and the device and precision a run would use.
pub fn print_dry_run_header(
    config: &std::path::Path,
    runtime: &crate::config::RuntimeConfig,
    device: tch::Device,
) {
    let precision = crate::precision::resolve(runtime.train.precision, device);
    println!(
        "config {} is valid; device {device:?}, precision {}",
        config.display(),
        precision.precision.name()
    );
    if let Some(note) = &precision.note {
        println!("  {note}");
    }
}

/// Prints parameter counts per top-level module, the total and the training state it needs
/// (`--dry-run`).
pub fn print_parameter_summary(vs: &tch::nn::VarStore, runtime: &crate::config::RuntimeConfig) {
    let summary = crate::trainer::parameter_summary(vs);
    for (module, n) in &summary {
        println!("  {module:<24} {n:>14} parameters");
    }
    print_total(summary.iter().map(|(_, n)| n).sum(), runtime);
}

/// The total line, then the memory its training state takes per process: fp32 weights,
/// gradients, AdamW's two moments and the EMA — with ZeRO-1 (`distributed.shard_optimizer`) the
/// moments and EMA split over the ranks (WORLD_SIZE, or 8 when unset), with ZeRO-2
/// (`shard_gradients` too) the gradients as well. Activations come on top.
fn print_total(total: i64, runtime: &crate::config::RuntimeConfig) {
    println!("  {:<24} {total:>14} parameters", "total");
    let ema = if runtime.train.ema_decay.is_some() {
        4.0
    } else {
        0.0
    };
    // fp32 weights, gradients, two moments, EMA.
    let (weights, grads, optimizer) = (4.0, 4.0, 8.0 + ema);
    let world = unclip_dist::DistEnv::from_env()
        .ok()
        .flatten()
        .map(|e| e.world_size)
        .filter(|&w| w > 1)
        .unwrap_or(8);
    let gib = |bytes_per_param: f64| total as f64 * bytes_per_param / (1u64 << 30) as f64;
    let w = world as f64;
    let state = gib(weights + grads + optimizer);
    let zero1 = gib(weights + grads + optimizer / w);
    let zero2 = gib(weights + (grads + optimizer) / w);
    let d = &runtime.distributed;
    if d.shard_optimizer && d.shard_gradients {
        println!(
            "  training state per process: {zero2:.1} GiB, sharded over {world} ranks \
             (distributed.shard_optimizer, shard_gradients; {state:.1} GiB unsharded); \
             activations on top"
        );
    } else if d.shard_optimizer {
        println!(
            "  training state per process: {zero1:.1} GiB, sharded over {world} ranks \
             (distributed.shard_optimizer; {zero2:.1} GiB with shard_gradients too, {state:.1} GiB \
             unsharded); activations on top"
        );
    } else {
        println!(
            "  training state per process: {state:.1} GiB ({zero1:.1} GiB over {world} ranks with \
             distributed.shard_optimizer, {zero2:.1} GiB with shard_gradients too); activations \
             on top"
        );
    }
}

/// Models above this many parameters are counted from their config by `--dry-run`, not built:
/// the paper's would allocate gigabytes just to be counted.
pub const DRY_RUN_BUILD_LIMIT: i64 = 300_000_000;

/// `--dry-run`'s parameter summary: the model `build` puts on a fresh `VarStore` on `device`, or,
/// when the `counted` rows (component, parameters from the config) total more than
/// [`DRY_RUN_BUILD_LIMIT`], those rows without building it.
pub fn print_model_parameters(
    device: tch::Device,
    runtime: &crate::config::RuntimeConfig,
    counted: &[(&str, i64)],
    build: impl FnOnce(tch::nn::Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if counted.iter().map(|(_, n)| n).sum::<i64>() > DRY_RUN_BUILD_LIMIT {
        print_counted_parameters(counted, runtime);
    } else {
        let vs = tch::nn::VarStore::new(device);
        build(vs.root())?;
        print_parameter_summary(&vs, runtime);
    }
    Ok(())
}

/// `--dry-run`'s summary for a model counted from its config: `(component, parameters)` rows and
/// the total, in [`print_parameter_summary`]'s format.
pub fn print_counted_parameters(
    components: &[(&str, i64)],
    runtime: &crate::config::RuntimeConfig,
) {
    println!("  (counted from the config, not built)");
    for (module, n) in components {
        println!("  {module:<24} {n:>14} parameters");
    }
    print_total(components.iter().map(|(_, n)| n).sum(), runtime);
}

/// What every trainer binary does once its task is built: announce the run on rank 0, then train
/// into `--run-dir` honouring `--resume`.
pub fn train_with_args<T: crate::TrainTask, C>(
    task: &mut T,
    vs: &tch::nn::VarStore,
    cfg: &crate::RunConfig<C>,
    args: &TrainArgs,
) -> anyhow::Result<crate::TrainSummary> {
    let run_dir = args.run_dir();
    if unclip_dist::DistEnv::from_env()?.is_none_or(|e| e.rank == 0) {
        let total: i64 = crate::trainer::parameter_summary(vs)
            .iter()
            .map(|(_, n)| n)
            .sum();
        println!(
            "run directory {} ({total} parameters, device {:?})",
            run_dir.display(),
            vs.device()
        );
    }
    let summary = crate::train(
        task,
        vs,
        &cfg.runtime,
        &cfg.resolved,
        &run_dir,
        args.resume.as_deref(),
    )?;
    if let Some(signal) = &summary.stopped_by {
        // Not a finished run: no final report, and a non-zero exit for whatever runs next.
        let saved = summary
            .last_checkpoint
            .as_ref()
            .map_or("by rank 0".into(), |p| p.display().to_string());
        anyhow::bail!(
            "{signal}: training stopped at step {} of {}; checkpoint written {saved}; the same \
             command with --resume auto continues it",
            summary.final_step,
            cfg.runtime.train.steps
        );
    }
    Ok(summary)
}

/// What a trainer binary's `main` does once its config is loaded and it is to train: seeds
/// libtorch, builds the task for this rank on a fresh `VarStore` (`build(vs, rank, world_size)`),
/// trains into `--run-dir`, then on rank 0 reports the final weights (`report(task, "current
/// weights" | "EMA weights")`, see [`report_current_then_ema`]) and prints the last checkpoint.
pub fn train_and_report<T: crate::TrainTask, C>(
    cfg: &crate::RunConfig<C>,
    args: &TrainArgs,
    build: impl FnOnce(&tch::nn::VarStore, usize, usize) -> anyhow::Result<T>,
    mut report: impl FnMut(&mut T, &str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let device = cfg.runtime.device()?;
    let env = unclip_dist::DistEnv::from_env()?;
    let (rank, world) = env.as_ref().map_or((0, 1), |e| (e.rank, e.world_size));
    tch::manual_seed(cfg.runtime.seed as i64);
    let vs = tch::nn::VarStore::new(device);
    let mut task = build(&vs, rank, world)?;
    let summary = train_with_args(&mut task, &vs, cfg, args)?;
    if summary.rank != 0 {
        return Ok(());
    }
    let ckpt = report_current_then_ema(&vs, &summary, |which| report(&mut task, which))?;
    println!("checkpoint {}", ckpt.display());
    Ok(())
}

/// `RUN/samples/final_ema.png` or `final_current.png` for the weights `which` names
/// ("EMA weights" / "current weights"), written from `grid`; its path.
pub fn write_final_grid(
    run_dir: &std::path::Path,
    which: &str,
    grid: &tch::Tensor,
) -> anyhow::Result<std::path::PathBuf> {
    let name = if which.starts_with("EMA") {
        "ema"
    } else {
        "current"
    };
    let file = run_dir.join("samples").join(format!("final_{name}.png"));
    crate::logging::write_png(&file, grid)?;
    Ok(file)
}

/// After training: `report("current weights")`, then, when the run's last checkpoint holds EMA
/// weights, loads them into `vs` and `report("EMA weights")`. Returns that checkpoint.
pub fn report_current_then_ema(
    vs: &tch::nn::VarStore,
    summary: &crate::TrainSummary,
    mut report: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    report("current weights")?;
    let ckpt = summary
        .last_checkpoint
        .clone()
        .or_else(|| summary.resumed_from.clone())
        .context("no checkpoint written")?;
    let ck = crate::checkpoint::load(&ckpt)?;
    if let Some(ema) = &ck.ema {
        crate::trainer::load_into(vs, ema, "EMA weights")?;
        report("EMA weights")?;
    }
    Ok(ckpt)
}

/// A task constructor: `(vs, cfg, seed, batch_size, rank, world_size, run_dir)`.
pub type NewTask<C, T> =
    fn(&tch::nn::VarStore, &C, u64, usize, usize, usize, Option<PathBuf>) -> anyhow::Result<T>;

/// A trainer binary of an image model (the decoder, the upsamplers): it trains, or instead writes
/// a held-out grid (`--grid`) or a diffusers export (`--export-diffusers`) of a run's weights.
/// [`image_trainer_main`] is such a binary's `main`.
pub trait ImageTrainer {
    /// The config's task sections.
    type Config: serde::de::DeserializeOwned + crate::config::Validate;
    type Task: crate::TrainTask;
    /// What the final grids are called in messages ("held-out samples").
    const GRID_NAME: &'static str;
    /// What the final grid's rows are ("real images, then one row per guidance scale").
    const GRID_ROWS: &'static str;

    /// The task's constructor: `(vs, cfg, seed, batch_size, rank, world_size, run_dir)` builds
    /// the task on `vs` for `rank` of `world_size` (`run_dir`: where rank 0 writes grids).
    const NEW_TASK: NewTask<Self::Config, Self::Task>;
    /// The held-out grid of the task's current weights and its summary line (None on ranks
    /// without the held-out set).
    fn held_out_grid(task: &Self::Task) -> anyhow::Result<Option<(tch::Tensor, String)>>;
    /// Builds the model under `p`.
    fn build(p: tch::nn::Path, cfg: &Self::Config) -> anyhow::Result<()>;
    /// `(component, parameters)` counted from the config, for `--dry-run` of huge models.
    fn counted(cfg: &Self::Config) -> Vec<(&'static str, i64)>;
    /// Writes the weights in `vs` in diffusers' layout into `out`; what was written, for the
    /// message.
    fn export(
        vs: &tch::nn::VarStore,
        cfg: &Self::Config,
        out: &std::path::Path,
    ) -> anyhow::Result<String>;
}

/// `train-decoder` / `train-upsampler`: `--grid`, `--export-diffusers`, `--dry-run`, or training
/// (data-parallel under torchrun) with the final grids of the current and EMA weights.
pub fn image_trainer_main<M: ImageTrainer>(
    args: &TrainArgs,
    inference: &InferenceArgs,
) -> anyhow::Result<()> {
    inference.check()?;
    let cfg = crate::load_config::<M::Config>(&args.config, &args.overrides)?;
    if let Some(out) = &inference.grid {
        let device = cfg.runtime.device()?;
        // The weights first: a missing checkpoint fails before the task loads its data.
        let (weights, source) = inference.weights(args)?;
        let vs = tch::nn::VarStore::new(device);
        let task = (M::NEW_TASK)(&vs, &cfg.task, cfg.runtime.seed, 1, 0, 1, None)?;
        crate::trainer::load_into(&vs, &weights, &source)?;
        if let Some((grid, summary)) = M::held_out_grid(&task)? {
            crate::logging::write_png(out, &grid)?;
            println!("{source}: {summary}");
            println!("wrote {}", out.display());
        }
        return Ok(());
    }
    if let Some(out) = &inference.export_diffusers {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        M::build(vs.root(), &cfg.task)?;
        let (weights, source) = inference.weights(args)?;
        crate::trainer::load_into(&vs, &weights, &source)?;
        let what = crate::publish::write_into_dir(out, |dir| M::export(&vs, &cfg.task, dir))?;
        println!("{source} -> {} ({what})", out.display());
        return Ok(());
    }
    let device = cfg.runtime.device()?;
    if args.dry_run {
        print_dry_run_header(&args.config, &cfg.runtime, device);
        return print_model_parameters(device, &cfg.runtime, &M::counted(&cfg.task), |p| {
            M::build(p, &cfg.task)
        });
    }
    let run_dir = args.run_dir();
    train_and_report(
        &cfg,
        args,
        |vs, rank, world| {
            (M::NEW_TASK)(
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
            if let Some((grid, summary)) = M::held_out_grid(task)? {
                let file = write_final_grid(&run_dir, which, &grid)?;
                println!("{}, {which}: {summary}", M::GRID_NAME);
                println!("  grid ({}): {}", M::GRID_ROWS, file.display());
            }
            Ok(())
        },
    )
}
