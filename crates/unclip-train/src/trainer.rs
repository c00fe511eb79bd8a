//! The loop every trainer shares: seeding per step, micro-batches with gradient accumulation,
//! non-finite guards, global-norm clipping, AdamW, EMA, logging and checkpoints with exact resume.

use crate::checkpoint::{self, CheckpointMeta, RetentionPolicy};
use crate::config::{LoggingConfig, ProgressStyle, RuntimeConfig};
use crate::distributed;
use crate::ema::{with_weights, Ema};
use crate::logging::Logger;
use crate::loss_scale::LossScaler;
use crate::lr::learning_rate;
use crate::named_variables;
use crate::optim::AdamW;
use crate::precision::{self, Precision};
use crate::shard::Shards;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Kind, Tensor};
use unclip_dist::ProcessGroup;

/// What a task returns for one micro-batch.
pub struct StepOutput {
    /// Scalar loss to minimise.
    pub loss: Tensor,
    /// Samples in the micro-batch (for samples/s).
    pub samples: usize,
    /// Extra scalars to log (averaged over the logging interval), e.g. loss per timestep quarter.
    pub metrics: Vec<(String, f64)>,
}

/// A model plus its data, as the runtime sees it.
pub trait TrainTask {
    type Batch;
    /// The batch for micro-batch `micro` of optimiser step `step`.
    fn next_batch(&mut self, step: u64, micro: usize) -> Result<Self::Batch>;
    /// Forward pass and loss (the runtime runs backward). Called twice per batch under SAM.
    fn loss(&mut self, batch: &Self::Batch) -> Result<StepOutput>;
    /// Where the data stream stands, stored in checkpoints.
    fn data_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn restore_data_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// Sample images for TensorBoard ([3, H, W], uint8 or float in [0, 1]), every
    /// `logging.images_every` steps on rank 0, without gradients, with the EMA weights in the
    /// model's variables when the run keeps an EMA.
    fn images(&mut self, _step: u64) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// Scalars measured on the last `images` call's samples (how well they match what they were
    /// conditioned on), logged to TensorBoard at the same step.
    fn sample_scalars(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }
    /// The data-parallel group, given once before the first step of a multi-process run, for
    /// tasks whose loss needs other ranks' activations (CLIP's global-batch contrastive loss).
    fn set_process_group(&mut self, _group: Rc<ProcessGroup>) {}
}

#[derive(Debug)]
pub struct TrainSummary {
    pub final_step: u64,
    /// (step, mean loss over its micro-batches) for every completed step of this run.
    pub losses: Vec<(u64, f64)>,
    pub nonfinite_skipped: u64,
    pub resumed_from: Option<PathBuf>,
    /// Written by rank 0 only; None on other ranks.
    pub last_checkpoint: Option<PathBuf>,
    /// This process's rank (0 without c10d).
    pub rank: usize,
    /// The signal that stopped the run before `train.steps` (SIGTERM, SIGUSR1, SIGINT), after a
    /// checkpoint of the step it was in; every rank stops at the same step.
    pub stopped_by: Option<String>,
}

/// The seed of a step: runs resumed at any step draw the same random numbers as uninterrupted ones.
/// Ranks draw different numbers.
fn step_seed(seed: u64, step: u64, rank: u64) -> i64 {
    let s = step.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (seed ^ s ^ rank.wrapping_mul(0xD1B5_4A32_D192_ED03)) as i64
}

/// One micro-batch: the task's loss under the configured autocast, then, when it is finite,
/// backward of loss · loss_scale / grad_accum (a reduced-precision loss upcast first so the
/// gradient seed is fp32). Returns the output and the (unscaled) loss value.
fn loss_and_backward<T: TrainTask>(
    task: &mut T,
    batch: &T::Batch,
    device: tch::Device,
    cfg: &crate::config::TrainConfig,
    loss_scale: Option<&LossScaler>,
    averager: Option<&distributed::GradientAverager>,
) -> Result<(StepOutput, f64)> {
    let out = {
        let _autocast = precision::autocast(device, cfg.precision);
        task.loss(batch)?
    };
    if let Some(a) = averager {
        // Every rank, also one whose loss is not finite (rank 0's graph decides).
        a.expect_gradients_of(&out.loss)?;
    }
    let value = out.loss.to_kind(Kind::Double).double_value(&[]);
    if value.is_finite() {
        let loss = match out.loss.kind() {
            Kind::BFloat16 | Kind::Half => out.loss.to_kind(Kind::Float),
            _ => out.loss.shallow_clone(),
        };
        match loss_scale {
            Some(s) => (loss * (s.scale() / cfg.grad_accum as f64)).backward(),
            None => (loss / cfg.grad_accum as f64).backward(),
        }
    }
    Ok((out, value))
}

/// [`loss_and_backward`] with gradient averaging around it: armed before the step's `last`
/// micro-batch (under ZeRO-2 before each), and under ZeRO-2 each micro-batch but the last sent
/// to the owners right after its backward (the caller averages the last).
fn averaged_micro_batch<T: TrainTask>(
    task: &mut T,
    batch: &T::Batch,
    device: tch::Device,
    cfg: &crate::config::TrainConfig,
    loss_scale: Option<&LossScaler>,
    averager: Option<&mut distributed::GradientAverager>,
    last: bool,
) -> Result<(StepOutput, f64)> {
    let averager = averager.filter(|a| last || a.every_micro_batch());
    if let Some(a) = &averager {
        a.arm(last)?;
    }
    let out = loss_and_backward(task, batch, device, cfg, loss_scale, averager.as_deref())?;
    if let (Some(a), false) = (averager, last) {
        a.average()?;
    }
    Ok(out)
}

/// What a step's gradients allow.
#[derive(Debug, Clone, Copy)]
enum Gradients {
    /// Finite, unscaled, with this global norm.
    Finite(f64),
    /// fp16 gradients overflowed at the current loss scale, which has been backed off.
    Overflow,
    /// A non-finite loss or gradient that loss scaling cannot explain.
    NonFinite,
}

/// Checks the (averaged) gradients of a step whose mean loss was `loss`; with a loss scaler,
/// divides the scale back out of finite gradients, or backs the scale off after an overflow.
/// `sharded_over`: the gradients are ZeRO-2's, each on its owner alone, so the norm is summed
/// over the group.
fn check_gradients(
    opt: &mut AdamW,
    loss_scale: Option<&mut LossScaler>,
    loss: f64,
    sharded_over: Option<&ProcessGroup>,
) -> Result<Gradients> {
    if !loss.is_finite() {
        return Ok(Gradients::NonFinite);
    }
    let norm = match sharded_over {
        Some(pg) => distributed::sharded_grad_norm(pg, opt)?,
        None => opt.grad_norm()?,
    };
    Ok(match loss_scale {
        None if norm.is_finite() => Gradients::Finite(norm),
        None => Gradients::NonFinite,
        Some(s) if norm.is_finite() => {
            opt.scale_gradients(1.0 / s.scale())?;
            Gradients::Finite(norm / s.scale())
        }
        Some(s) => {
            if s.overflowed() {
                Gradients::Overflow
            } else {
                Gradients::NonFinite
            }
        }
    })
}

/// The diffusers model directory `dir` names: itself when it holds a `config.json`, its
/// `subfolder` when it is a pipeline directory (`model_index.json`, e.g. Karlo's); `class` (e.g.
/// `PriorTransformer`) names the model in the error.
pub fn diffusers_component_dir(dir: &Path, subfolder: &str, class: &str) -> Result<PathBuf> {
    if dir.join("config.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    if dir.join("model_index.json").is_file() {
        return Ok(dir.join(subfolder));
    }
    bail!(
        "{}: neither a {class} directory (config.json) nor a diffusers pipeline directory \
         (model_index.json)",
        dir.display()
    )
}

/// Copies named tensors into the variables of `vs`; names and shapes must match exactly.
pub fn load_into(vs: &VarStore, tensors: &HashMap<String, Tensor>, what: &str) -> Result<()> {
    let vars = vs.variables();
    for name in tensors.keys() {
        if !vars.contains_key(name) {
            bail!("{what} has `{name}`, which the model does not");
        }
    }
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let Some(src) = tensors.get(&name) else {
                bail!("{what} lacks `{name}`")
            };
            if src.size() != var.size() {
                bail!(
                    "{what}: `{name}` has shape {:?}, the model {:?}",
                    src.size(),
                    var.size()
                );
            }
            var.copy_(src);
        }
        Ok(())
    })
}

/// Parameter counts per top-level module, for `--dry-run`.
pub fn parameter_summary(vs: &VarStore) -> Vec<(String, i64)> {
    let mut by_module: BTreeMap<String, i64> = BTreeMap::new();
    for (name, t) in vs.variables() {
        let top = name.split('.').next().unwrap_or("").to_string();
        *by_module.entry(top).or_default() += t.numel() as i64;
    }
    by_module.into_iter().collect()
}

/// What to tell a run resumed on another number of processes than saved its checkpoint: the
/// weights and optimiser state carry over whole (checkpoints are unsharded), the data position
/// does not quite — it counts rank 0's samples in the old split of the shards among the ranks.
pub fn world_size_note(saved: Option<usize>, now: usize) -> Option<String> {
    let saved = saved.filter(|&s| s != now)?;
    Some(format!(
        "resuming on {now} process(es) a run that {saved} saved: weights, EMA and optimiser state \
         carry over whole, but the data position is rank 0's in the old split of the shards, so \
         this epoch's remaining samples are read as the new split places them (some again, some \
         not until the next epoch)"
    ))
}

/// Resolves `--resume`: `auto` is the newest complete checkpoint of the run (none: fresh start).
pub fn resolve_resume(run_dir: &Path, resume: Option<&str>) -> Result<Option<PathBuf>> {
    match resume {
        None => Ok(None),
        Some("auto") => checkpoint::latest(&checkpoint::checkpoints_dir(run_dir)),
        Some(path) => {
            let p = PathBuf::from(path);
            if !p.join("meta.json").is_file() {
                bail!("--resume {path}: not a checkpoint directory (no meta.json)");
            }
            Ok(Some(p))
        }
    }
}

/// Trains `task`'s variables in `vs` to `runtime.train.steps`, writing into `run_dir`.
pub fn train<T: TrainTask>(
    task: &mut T,
    vs: &VarStore,
    runtime: &RuntimeConfig,
    resolved_config: &serde_yaml::Value,
    run_dir: &Path,
    resume: Option<&str>,
) -> Result<TrainSummary> {
    let resolved_precision = precision::resolve(runtime.train.precision, vs.device());
    let train_cfg = crate::config::TrainConfig {
        precision: resolved_precision.precision,
        ..runtime.train.clone()
    };
    let cfg = &train_cfg;
    let dist = distributed::group_from_env(&runtime.distributed, vs.device())?.map(Rc::new);
    let rank = dist.as_ref().map_or(0, |g| g.rank());
    let world_size = dist.as_ref().map_or(1, |g| g.world_size());
    let rank0 = rank == 0;
    let ckpt_root = checkpoint::checkpoints_dir(run_dir);
    if resume.is_none() {
        // A fresh run among another run's checkpoints would have its own pruned as the oldest,
        // and a later `--resume auto` would continue the other run.
        if let Some(newest) = checkpoint::latest(&ckpt_root)? {
            bail!(
                "run directory {} already holds checkpoints (newest {}): pass --resume auto to \
                 continue that run, or another --run-dir for a fresh one",
                run_dir.display(),
                newest.display()
            );
        }
    }
    if rank0 {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating run directory {}", run_dir.display()))?;
        let config_path = run_dir.join("config.yaml");
        std::fs::write(&config_path, serde_yaml::to_string(resolved_config)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
    }
    if let Some(pg) = &dist {
        distributed::broadcast_variables(pg, vs)?;
        task.set_process_group(pg.clone());
    }
    precision::set_tf32(cfg.tf32);
    crate::malloc::retain_freed_memory();
    let bucket_bytes = runtime.distributed.bucket_bytes();

    if cfg.channels_last {
        // Before the optimiser and EMA, whose state tensors copy the variables' layout.
        precision::to_channels_last(vs);
    }
    let named = named_variables(vs);
    // ZeRO-1: this rank keeps optimiser state and EMA weights for its share of the variables.
    let shards = match (&dist, runtime.distributed.shard_optimizer) {
        (Some(pg), true) => Some(Shards::new(&named, pg.rank(), pg.world_size())),
        _ => None,
    };
    let owns = |name: &str| shards.as_ref().is_none_or(|s| s.owns(name));
    // ZeRO-2: gradients reduced to their owners alone; the norm is then summed over the group.
    let grads_sharded_over = match (&dist, &shards) {
        (Some(pg), Some(_)) if runtime.distributed.shard_gradients => Some(pg.as_ref()),
        _ => None,
    };
    let mut opt = AdamW::sharded(vs, cfg, owns);
    let mut scaler = (cfg.precision == Precision::Fp16).then(|| LossScaler::new(&cfg.loss_scale));
    let mut ema = cfg
        .ema_decay
        .map(|d| Ema::sharded(vs, d, cfg.ema_warmup, owns));
    let mut start = 0u64;
    let mut nonfinite_skipped = 0u64;
    let mut resume_note = None;
    let resumed_from = resolve_resume(run_dir, resume)?;
    if let Some(dir) = &resumed_from {
        let ck = checkpoint::load(dir)?;
        load_into(
            vs,
            &ck.model,
            &format!("{}/model.safetensors", dir.display()),
        )?;
        opt.load_state(
            &ck.optimizer,
            ck.meta.optimizer_steps.unwrap_or(ck.meta.step),
        )
        .with_context(|| format!("{}/optimizer.safetensors", dir.display()))?;
        if let (Some(ema), Some(tensors)) = (ema.as_mut(), ck.ema.as_ref()) {
            ema.load(tensors, ck.meta.ema_updates)
                .with_context(|| format!("{}/ema.safetensors", dir.display()))?;
        }
        if let (Some(s), Some(state)) = (scaler.as_mut(), ck.meta.loss_scale) {
            s.restore(state);
        }
        task.restore_data_state(&ck.meta.data_state)?;
        start = ck.meta.step;
        nonfinite_skipped = ck.meta.nonfinite_skipped;
        resume_note = world_size_note(ck.meta.world_size, world_size);
    }

    // Only rank 0 writes logs and checkpoints.
    let log_cfg = if rank0 {
        runtime.logging.clone()
    } else {
        LoggingConfig {
            tensorboard: false,
            jsonl: false,
            progress: ProgressStyle::Off,
            ..runtime.logging.clone()
        }
    };
    let mut logger = Logger::new(run_dir, &log_cfg, cfg.steps, start)?;
    if let Some(note) = &resolved_precision.note {
        logger.message(note);
    }
    if let Some(dir) = &resumed_from {
        logger.message(&format!("resumed from {} at step {start}", dir.display()));
    }
    if let (Some(note), true) = (&resume_note, rank0) {
        logger.message(note);
    }
    if runtime.distributed.shard_optimizer && dist.is_none() && rank0 {
        logger
            .message("distributed.shard_optimizer: a single process has nothing to shard it over");
    }
    if let (Some(s), true) = (&shards, rank0) {
        let (own, all) = s.owned_numel();
        let what = if grads_sharded_over.is_some() {
            "ZeRO-2: averaged gradients, AdamW moments and EMA weights"
        } else {
            "ZeRO-1: AdamW moments and EMA weights"
        };
        logger.message(&format!(
            "{what} sharded over {} ranks; rank 0 keeps those of {own} of {all} parameters",
            s.world_size()
        ));
    }
    if runtime.distributed.shard_gradients && dist.is_none() && rank0 {
        logger
            .message("distributed.shard_gradients: a single process has nothing to shard it over");
    }
    let mut averager = match &dist {
        Some(pg) => {
            let owners = match (&shards, grads_sharded_over) {
                (Some(s), Some(_)) => Some(
                    opt.variable_names()
                        .map(|name| s.owner(name).context("a variable outside the partition"))
                        .collect::<Result<Vec<_>>>()?,
                ),
                _ => None,
            };
            Some(distributed::GradientAverager::new(
                pg,
                vs,
                &opt.variables().collect::<Vec<_>>(),
                &runtime.distributed,
                owners,
            )?)
        }
        None => None,
    };
    // Under ZeRO-1 / ZeRO-2 a rank changes only the variables it owns (after an update; under
    // ZeRO-2 also by SAM's perturbation); their owners then send the new values to every rank.
    let share_owned = || -> Result<()> {
        if let (Some(s), Some(pg)) = (&shards, &dist) {
            s.broadcast_from_owners(pg, &named, bucket_bytes)?;
        }
        Ok(())
    };
    let policy = RetentionPolicy {
        keep_last: runtime.checkpoint.keep_last,
        milestone_every: runtime.checkpoint.milestone_every,
    };
    let config_json = serde_json::to_value(resolved_config)?;
    let mut losses = Vec::new();
    let mut last_checkpoint = None;
    let mut consecutive_bad = 0u32;
    // Sums over the current logging interval.
    let (mut int_loss, mut int_norm, mut int_steps, mut int_samples) =
        (0.0f64, 0.0f64, 0u64, 0usize);
    let (mut int_data_secs, mut int_reduce_secs, mut int_secs) = (0.0f64, 0.0f64, 0.0f64);
    let mut int_metrics: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    let run_start = Instant::now();
    let _handlers =
        crate::stop::install().context("installing the SIGTERM / SIGUSR1 / SIGINT handlers")?;
    let mut stopped_by = None;
    let mut final_step = cfg.steps.max(start);

    for step in start..cfg.steps {
        let step_start = Instant::now();
        tch::manual_seed(step_seed(runtime.seed, step, rank as u64));
        opt.zero_grad()?;
        let mut loss_sum = 0.0f64;
        let mut samples = 0usize;
        let mut data_secs = 0.0f64;
        let mut kept = Vec::new(); // the micro-batches, for SAM's second pass
        for micro in 0..cfg.grad_accum {
            let t0 = Instant::now();
            let batch = task.next_batch(step, micro)?;
            data_secs += t0.elapsed().as_secs_f64();
            let (out, value) = averaged_micro_batch(
                task,
                &batch,
                vs.device(),
                cfg,
                scaler.as_ref(),
                averager.as_mut(),
                micro + 1 == cfg.grad_accum,
            )?;
            loss_sum += value;
            samples += out.samples;
            for (k, v) in out.metrics {
                let e = int_metrics.entry(k).or_default();
                e.0 += v;
                e.1 += 1;
            }
            if cfg.sam_rho.is_some() {
                kept.push(batch);
            }
        }
        let mut reduce_secs = 0.0f64;
        if let Some(a) = averager.as_mut() {
            let late_before = a.late_steps;
            a.average()?;
            // This step's, and the previous step's SAM second average.
            reduce_secs = a.take_wait_secs();
            if let (Some(r), true) = (a.last, rank0 && step == start) {
                if a.overlaps() && a.every_micro_batch() {
                    // How well the order predicted before backward held: gradients behind a
                    // bucket that still waits for a later one are held until it goes.
                    logger.message(&format!(
                        "first step: gradients sent to their owners in {} bucket(s) of the \
                         order the loss's graph gives, {} started during backward, at most {:.1} \
                         MiB waiting to be sent at once",
                        r.buckets,
                        r.started_in_backward,
                        r.peak_waiting_bytes as f64 / (1 << 20) as f64
                    ));
                }
            }
            if let (Some(r), true) = (a.last, rank0 && step == start + 1) {
                logger.message(&if a.overlaps() {
                    format!(
                        "gradients averaged in {} bucket(s), {} started during backward, at \
                         most {:.1} MiB waiting to be sent at once",
                        r.buckets,
                        r.started_in_backward,
                        r.peak_waiting_bytes as f64 / (1 << 20) as f64
                    )
                } else {
                    format!(
                        "gradients averaged in {} bucket(s) after backward",
                        r.buckets
                    )
                });
            }
            if a.late_steps == 1 && late_before == 0 && rank0 {
                logger.message(&format!(
                    "step {step}: a gradient came in after its bucket had been sent (the graph \
                     changed since the first step); averaged again after backward, as whenever \
                     this recurs"
                ));
            }
        }
        // Ranks agree on the loss (so all skip a non-finite step together) and on stopping (a
        // signal to any rank stops all after this step).
        let local = [
            loss_sum / cfg.grad_accum as f64,
            samples as f64,
            data_secs,
            crate::stop::as_flag(),
            reduce_secs,
        ];
        let reduced = distributed::mean_over_ranks(dist.as_deref(), &local)?;
        let stop_now = reduced[3] > 0.0;
        let (loss, data_secs, reduce_secs) = (reduced[0], reduced[2], reduced[4]);
        let samples = (reduced[1] * world_size as f64).round() as usize;
        let mut gradients = check_gradients(&mut opt, scaler.as_mut(), loss, grads_sharded_over)?;
        if let (Some(rho), Gradients::Finite(norm)) = (cfg.sam_rho, gradients) {
            // SAM (Foret et al. 2021): the gradient at w + ρ·g/‖g‖, applied at w.
            let perturbation = opt.sam_ascend(rho, norm);
            if grads_sharded_over.is_some() {
                share_owned()?;
            }
            opt.zero_grad()?;
            let mut second = 0.0f64;
            for (k, batch) in kept.iter().enumerate() {
                let last = k + 1 == kept.len();
                let averager = averager.as_mut();
                let scale = scaler.as_ref();
                second +=
                    averaged_micro_batch(task, batch, vs.device(), cfg, scale, averager, last)?.1;
            }
            if let Some(a) = averager.as_mut() {
                a.average()?;
            }
            let second = distributed::mean_over_ranks(dist.as_deref(), &[second])?[0];
            opt.sam_descend(perturbation);
            gradients = check_gradients(&mut opt, scaler.as_mut(), second, grads_sharded_over)?;
            if grads_sharded_over.is_some() && !matches!(gradients, Gradients::Finite(_)) {
                // No update follows to share: take the others' variables back off w + e here.
                share_owned()?;
            }
        }
        // A skipped step still counts as done: its checkpoint and logs are written as usual.
        let lr = learning_rate(cfg, step);
        match gradients {
            Gradients::Finite(norm) => {
                consecutive_bad = 0;
                if let Some(max) = cfg.grad_clip {
                    opt.clip_grad_norm(norm, max)?;
                }
                opt.step(lr)?;
                share_owned()?;
                if let Some(s) = scaler.as_mut() {
                    s.stepped();
                }
                if let Some(ema) = ema.as_mut() {
                    ema.update()?;
                }
                losses.push((step, loss));
                int_loss += loss;
                int_norm += norm;
                int_steps += 1;
            }
            Gradients::Overflow => {
                // Expected now and then in fp16: not a failure, and not counted as one.
                opt.zero_grad()?;
                logger.message(&format!(
                    "step {step}: fp16 gradients overflowed; skipped, loss scale now {}",
                    scaler.as_ref().map_or(0.0, LossScaler::scale)
                ));
            }
            Gradients::NonFinite => {
                nonfinite_skipped += 1;
                consecutive_bad += 1;
                opt.zero_grad()?;
                logger.message(&format!(
                    "step {step}: non-finite loss or gradient (loss {loss}); skipped"
                ));
                if consecutive_bad >= cfg.max_nonfinite_steps {
                    bail!(
                        "{consecutive_bad} consecutive steps had a non-finite loss or gradient (last at step {step}); \
                         stopping. The last checkpoint is intact: {}",
                        last_checkpoint.as_ref().or(resumed_from.as_ref()).map_or("none yet".into(), |p: &PathBuf| p.display().to_string())
                    );
                }
            }
        }

        let done = step + 1;
        int_samples += samples;
        int_data_secs += data_secs;
        int_reduce_secs += reduce_secs;
        int_secs += step_start.elapsed().as_secs_f64();
        let log_step = done % runtime.logging.every == 0 || done == cfg.steps || stop_now;
        let samples_per_sec = int_samples as f64 / int_secs.max(1e-9);
        let eta =
            run_start.elapsed().as_secs_f64() / (done - start) as f64 * (cfg.steps - done) as f64;
        logger.progress(
            done,
            int_loss / int_steps.max(1) as f64,
            samples_per_sec,
            eta,
            log_step,
        );
        if log_step {
            let n = int_steps.max(1) as f64;
            let mut scalars = vec![
                ("train/loss".to_string(), int_loss / n),
                ("train/lr".to_string(), lr),
                ("train/grad_norm".to_string(), int_norm / n),
                ("perf/samples_per_sec".to_string(), samples_per_sec),
                (
                    "perf/data_wait_fraction".to_string(),
                    int_data_secs / int_secs.max(1e-9),
                ),
                (
                    "train/nonfinite_skipped".to_string(),
                    nonfinite_skipped as f64,
                ),
            ];
            if dist.is_some() {
                // What gradient averaging left the step waiting for after backward.
                scalars.push((
                    "perf/grad_reduce_wait_fraction".to_string(),
                    int_reduce_secs / int_secs.max(1e-9),
                ));
            }
            if let Some(s) = &scaler {
                scalars.push(("train/loss_scale".to_string(), s.scale()));
                scalars.push((
                    "train/loss_scale_overflows".to_string(),
                    s.state().overflows as f64,
                ));
            }
            let local: Vec<(String, f64)> = std::mem::take(&mut int_metrics)
                .into_iter()
                .map(|(k, (sum, count))| (k, sum / count.max(1) as f64))
                .collect();
            for (k, v) in distributed::mean_metrics(dist.as_deref(), local)? {
                scalars.push((format!("train/{k}"), v));
            }
            logger.scalars(done, &scalars)?;
            (
                int_loss,
                int_norm,
                int_steps,
                int_samples,
                int_data_secs,
                int_reduce_secs,
                int_secs,
            ) = (0.0, 0.0, 0, 0, 0.0, 0.0, 0.0);
        }
        let images_due = runtime.logging.images_every.is_some_and(|n| done % n == 0);
        let checkpoint_due = done % runtime.checkpoint.every == 0 || done == cfg.steps || stop_now;
        // The EMA weights rank 0 samples with (what sampling and export use) and saves: its own,
        // or under ZeRO-1 gathered from their owners, which every rank takes part in.
        let full_ema = match (&ema, &shards, &dist) {
            (Some(ema), Some(s), Some(pg)) if images_due || checkpoint_due => {
                s.gather_ema(pg, &ema.tensors(), bucket_bytes)?
            }
            (Some(ema), None, _) if rank0 && (images_due || checkpoint_due) => Some(ema.tensors()),
            _ => None,
        };
        if rank0 && images_due {
            let images = match &full_ema {
                Some(weights) => with_weights(vs, weights, || tch::no_grad(|| task.images(done))),
                None => tch::no_grad(|| task.images(done)),
            };
            logger.images(done, &images?)?;
            logger.scalars(done, &task.sample_scalars())?;
        }
        let optimizer_state = match (&shards, &dist) {
            (Some(s), Some(pg)) if checkpoint_due => {
                s.gather_optimizer_state(pg, &opt.state_tensors(), bucket_bytes)?
            }
            _ if rank0 && checkpoint_due => Some(opt.state_tensors()),
            _ => None,
        };
        if let (true, Some(optimizer_state)) = (rank0, optimizer_state) {
            let mut meta = CheckpointMeta::new(done);
            meta.ema_updates = ema.as_ref().map_or(0, Ema::updates);
            meta.nonfinite_skipped = nonfinite_skipped;
            meta.seed = runtime.seed;
            meta.loss_scale = scaler.as_ref().map(LossScaler::state);
            meta.optimizer_steps = Some(opt.steps_taken());
            meta.world_size = Some(world_size);
            meta.data_state = task.data_state();
            meta.config = config_json.clone();
            let dir = checkpoint::save(
                &ckpt_root,
                &meta,
                &named,
                full_ema.as_deref(),
                &optimizer_state,
            )?;
            policy.prune(&ckpt_root)?;
            last_checkpoint = Some(dir);
        }
        if stop_now {
            let signal = crate::stop::requested().unwrap_or("another rank's signal");
            logger.message(&format!(
                "{signal}: stopped at step {done} of {} after writing its checkpoint",
                cfg.steps
            ));
            stopped_by = Some(signal.to_string());
            final_step = done;
            break;
        }
    }
    logger.finish();
    if let Some(pg) = &dist {
        pg.barrier().context("final barrier")?;
    }
    Ok(TrainSummary {
        final_step,
        losses,
        nonfinite_skipped,
        resumed_from,
        last_checkpoint,
        rank,
        stopped_by,
    })
}
