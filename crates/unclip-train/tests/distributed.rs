//! Data-parallel training over Gloo on loopback: 2 ranks with half the batch each end with the
//! same weights as one process over the whole batch, with or without ZeRO-1 sharding of the
//! optimiser state and EMA. This test binary re-runs itself as the ranks.
mod common;

use anyhow::Result;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};
use unclip_diffusion::nn::checkpoint::{checkpoint_one, Shared};
use unclip_dist::launch::launch_local;
use unclip_testkit::max_abs_diff;
use unclip_train::config::{parse_config, Validate};
use unclip_train::trainer::world_size_note;
use unclip_train::{train, StepOutput, TrainTask};

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoTaskSections {}
impl Validate for NoTaskSections {}

const CONFIG: &str = "
seed: 3
device: cpu
train: {steps: 12, batch_size: 16, grad_accum: 2, lr: 1.0e-2, ema_decay: 0.9, grad_clip: 0.5, weight_decay: 0.01}
logging: {every: 4, progress: off}
checkpoint: {every: 12}
distributed: {timeout_secs: 30, bucket_mb: 0.001}
";

/// y = sin(x·w) on a fixed set of 256 points; each rank takes its slice of every global batch.
struct Regression {
    fc1: Shared<nn::Linear>,
    fc2: nn::Linear,
    /// fc1 used by two activation-checkpointed blocks, so its gradient accumulates twice in each
    /// backward (once in each block's recomputation).
    checkpointed: bool,
    /// The model's variables, for the sum its "images" report.
    vars: Vec<Tensor>,
    x: Tensor,
    y: Tensor,
    batch: i64,
    rank: i64,
    world: i64,
    /// The step being trained, its batches and the losses computed in it: SAM's second pass is
    /// the losses beyond the batches.
    step: u64,
    batches_in_step: usize,
    losses_in_step: usize,
}

impl Regression {
    fn new(vs: &nn::VarStore, batch: i64, rank: i64, world: i64, checkpointed: bool) -> Self {
        let x = Tensor::linspace(-2.0, 2.0, 256 * 4, (Kind::Float, Device::Cpu))
            .view([256, 4])
            .sin()
            * 1.5;
        let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).view([4, 1]);
        let y = x.matmul(&w).sin();
        tch::manual_seed(11); // identical initial weights in every process (rank 0's are broadcast anyway)
        let p = vs.root();
        let fc1 = Shared::new(nn::linear(&p / "fc1", 4, 32, Default::default()));
        let fc2 = nn::linear(&p / "fc2", 32, 1, Default::default());
        Self {
            fc1,
            fc2,
            checkpointed,
            vars: vs.trainable_variables(),
            x,
            y,
            batch,
            rank,
            world,
            step: 0,
            batches_in_step: 0,
            losses_in_step: 0,
        }
    }
}

impl TrainTask for Regression {
    type Batch = (Tensor, Tensor);
    fn next_batch(&mut self, step: u64, micro: usize) -> Result<(Tensor, Tensor)> {
        // Rank 1 alone is sent SIGTERM at this step.
        let sigterm_at = std::env::var("UNCLIP_TEST_SIGTERM_AT").ok();
        if self.rank == 1 && micro == 0 && sigterm_at == Some(step.to_string()) {
            // SAFETY: raise only delivers the signal to this process, whose handlers are set.
            assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        }
        if micro == 0 {
            (self.step, self.batches_in_step, self.losses_in_step) = (step, 0, 0);
        }
        self.batches_in_step += 1;
        let global = self.batch * self.world;
        let start = ((step as i64 * 2 + micro as i64) * global + self.rank * self.batch) % 256;
        Ok((
            self.x.narrow(0, start, self.batch),
            self.y.narrow(0, start, self.batch),
        ))
    }
    fn loss(&mut self, (x, y): &(Tensor, Tensor)) -> Result<StepOutput> {
        let hidden = if self.checkpointed {
            // The blocks need an input that wants a gradient, or there is nothing to recompute.
            let x = x.detach().set_requires_grad(true);
            let block = |scale: f64| {
                let fc1 = self.fc1.clone();
                checkpoint_one(&[&x], move |xs: &[Tensor]| {
                    Ok::<_, String>(fc1.forward(&(&xs[0] * scale)).tanh())
                })
            };
            block(1.0)? + block(0.5)?
        } else {
            self.fc1.forward(x).tanh()
        };
        let mut loss = (self.fc2.forward(&hidden) - y).square().mean(Kind::Float);
        // SAM's second pass of this step goes non-finite, on rank 0.
        self.losses_in_step += 1;
        let second_pass = self.losses_in_step > self.batches_in_step;
        let nan_at = std::env::var("UNCLIP_TEST_SAM_NAN_AT").ok();
        if self.rank == 0 && second_pass && nan_at == Some(self.step.to_string()) {
            loss *= f64::NAN;
        }
        // A metric that differs per rank: rank 0 must log its mean over ranks.
        let metrics = vec![("rank_id".to_string(), self.rank as f64)];
        Ok(StepOutput {
            loss,
            samples: self.batch as usize,
            metrics,
        })
    }
    /// The sum of the weights the model holds while sampling (the EMA's), as a 1×1 "image" in
    /// [0, 1] would lose it: written to the run directory instead.
    fn images(&mut self, step: u64) -> Result<Vec<(String, Tensor)>> {
        let sum: f64 = self
            .vars
            .iter()
            .map(|v| v.sum(Kind::Double).double_value(&[]))
            .sum();
        let dir = std::env::var("UNCLIP_TEST_RUN_DIR")?;
        std::fs::write(
            Path::new(&dir).join(format!("images-{step}.txt")),
            sum.to_string(),
        )?;
        Ok(Vec::new())
    }
}

fn run(
    dir: &Path,
    batch: usize,
    overrides: &[String],
    resume: Option<&str>,
) -> unclip_train::TrainSummary {
    run_model(dir, batch, overrides, resume, false)
}

/// [`run`], with `checkpointed` choosing the model (see [`Regression`]).
fn run_model(
    dir: &Path,
    batch: usize,
    overrides: &[String],
    resume: Option<&str>,
    checkpointed: bool,
) -> unclip_train::TrainSummary {
    let mut overrides = overrides.to_vec();
    overrides.push(format!("train.batch_size={batch}"));
    let cfg = parse_config::<NoTaskSections>(CONFIG, &overrides).unwrap();
    let env = unclip_dist::DistEnv::from_env().unwrap();
    let (rank, world) = env.map_or((0, 1), |e| (e.rank as i64, e.world_size as i64));
    let vs = nn::VarStore::new(Device::Cpu);
    let mut task = Regression::new(&vs, batch as i64, rank, world, checkpointed);
    train(&mut task, &vs, &cfg.runtime, &cfg.resolved, dir, resume).unwrap()
}

#[test]
#[ignore = "a rank of the multi-process tests below"]
fn data_parallel_rank() {
    let Ok(dir) = std::env::var("UNCLIP_TEST_RUN_DIR") else {
        return;
    };
    let overrides: Vec<String> = std::env::var("UNCLIP_TEST_SET")
        .unwrap_or_default()
        .split(';')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let resume = std::env::var("UNCLIP_TEST_RESUME").ok();
    let checkpointed = std::env::var("UNCLIP_TEST_CHECKPOINTED").is_ok();
    let summary = run_model(
        Path::new(&dir),
        16,
        &overrides,
        resume.as_deref(),
        checkpointed,
    );
    println!("rank done at step {}", summary.final_step);
    if let Some(signal) = summary.stopped_by {
        println!("stopped by {signal}");
    }
}

/// Two ranks of this binary training into `dir` with `overrides` (`;`-separated), to `steps`;
/// returns rank 0's output.
fn two_ranks(dir: &Path, overrides: &str, resume: Option<&str>, steps: u64) -> String {
    two_ranks_with(dir, overrides, resume, steps, &[])[0].clone()
}

/// [`two_ranks`] with more environment; every rank's output.
fn two_ranks_with(
    dir: &Path,
    overrides: &str,
    resume: Option<&str>,
    steps: u64,
    extra_env: &[(&str, &str)],
) -> Vec<String> {
    let ranks = launch_ranks(dir, overrides, resume, extra_env);
    for r in &ranks {
        assert!(
            r.success && r.output.contains(&format!("rank done at step {steps}")),
            "rank {} failed:\n{}",
            r.rank,
            r.output
        );
    }
    ranks.into_iter().map(|r| r.output).collect()
}

/// Two ranks of this binary training into `dir`, however they end.
fn launch_ranks(
    dir: &Path,
    overrides: &str,
    resume: Option<&str>,
    extra_env: &[(&str, &str)],
) -> Vec<unclip_dist::launch::RankOutput> {
    let exe = std::env::current_exe().unwrap();
    let args = [
        "--exact",
        "data_parallel_rank",
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ];
    let mut env = vec![
        ("UNCLIP_TEST_RUN_DIR", dir.to_str().unwrap()),
        ("UNCLIP_TEST_SET", overrides),
    ];
    if let Some(r) = resume {
        env.push(("UNCLIP_TEST_RESUME", r));
    }
    env.extend_from_slice(extra_env);
    launch_local(&exe, &args, 2, &env, Duration::from_secs(120)).expect("ranks hang")
}

fn checkpoint_file(dir: &Path, step: u64, file: &str) -> HashMap<String, Tensor> {
    let ck = dir.join(format!("checkpoints/step-{step:09}")).join(file);
    Tensor::read_safetensors(&ck)
        .unwrap_or_else(|e| panic!("{}: {e}", ck.display()))
        .into_iter()
        .collect()
}

fn weights(dir: &Path, file: &str) -> HashMap<String, Tensor> {
    checkpoint_file(dir, 12, file)
}

const CHECKPOINT_FILES: [&str; 3] = [
    "model.safetensors",
    "ema.safetensors",
    "optimizer.safetensors",
];

/// The step-12 checkpoints of a one-process run and a 2-rank run hold the same tensors to 1e-5.
fn assert_matches_one_process(single: &Path, multi: &Path) {
    assert_close_checkpoints(single, multi, "between 1 process and 2 ranks");
}

/// The step-12 checkpoints of runs `a` and `b` hold the same tensors to 1e-5.
fn assert_close_checkpoints(a: &Path, b: &Path, what: &str) {
    for file in CHECKPOINT_FILES {
        let (ta, tb) = (weights(a, file), weights(b, file));
        assert_eq!(ta.len(), tb.len());
        for (k, t) in &ta {
            let d = max_abs_diff(t, &tb[k]);
            assert!(d < 1e-5, "{file}: `{k}` differs by {d} {what}");
        }
    }
}

/// The step-12 checkpoints of runs `a` and `b` hold the same tensors, bit for bit.
fn assert_same_checkpoints(a: &Path, b: &Path, what: &str) {
    for file in CHECKPOINT_FILES {
        let (ta, tb) = (weights(a, file), weights(b, file));
        assert_eq!(ta.len(), tb.len(), "{file}: tensors");
        for (k, t) in &ta {
            assert!(t.equal(&tb[k]), "{file}: `{k}` differs {what}");
        }
    }
}

#[test]
fn two_gloo_ranks_match_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let losses = run(&single, 32, &[], None).losses;
    assert!(
        losses.last().unwrap().1 < losses[0].1,
        "the regression learns: {losses:?}"
    );

    let multi = tmp.path().join("multi");
    two_ranks(&multi, "", None, 12);
    assert!(!multi.join("checkpoints").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));
    assert_matches_one_process(&single, &multi);
    // Only rank 0 wrote logs, and they hold means over ranks.
    assert_eq!(
        std::fs::read_dir(multi.join("tensorboard"))
            .unwrap()
            .count(),
        1
    );
    let scalars = unclip_testkit::read_scalars(&multi.join("tensorboard"));
    assert_eq!(scalars[&("train/rank_id".to_string(), 12)], 0.5);
    // The share of the step spent on averaging gradients, logged only over several processes.
    let wait = scalars[&("perf/grad_reduce_wait_fraction".to_string(), 12)];
    assert!(wait > 0.0 && wait < 1.0, "grad_reduce_wait_fraction {wait}");
    let single_scalars = unclip_testkit::read_scalars(&single.join("tensorboard"));
    assert!(!single_scalars.contains_key(&("perf/grad_reduce_wait_fraction".to_string(), 12)));
    let single_loss = single_scalars[&("train/loss".to_string(), 12)];
    let multi_loss = scalars[&("train/loss".to_string(), 12)];
    assert!(
        (single_loss - multi_loss).abs() < 1e-5,
        "logged loss {single_loss} vs {multi_loss}"
    );
}

#[test]
fn sharded_optimizer_state_gives_the_same_run_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let images = "logging.images_every=12";
    let plain = tmp.path().join("plain");
    two_ranks(&plain, images, None, 12);
    let sharded = tmp.path().join("sharded");
    let zero = format!("{images};distributed.shard_optimizer=true");
    let log = two_ranks(&sharded, &zero, None, 12);
    assert!(log.contains("ZeRO-1"), "rank 0 says it shards:\n{log}");

    // Each rank updates its own share with the same all-reduced gradients: the same updates, and
    // the checkpoint gathered to rank 0 holds every tensor, bit for bit.
    assert_same_checkpoints(&plain, &sharded, "with sharding");
    // Rank 0 sampled with the whole EMA (gathered from both ranks' shares).
    let ema_sum: f64 = weights(&sharded, "ema.safetensors")
        .values()
        .map(|t| t.sum(Kind::Double).double_value(&[]))
        .sum();
    for run in [&plain, &sharded] {
        let logged: f64 = std::fs::read_to_string(run.join("images-12.txt"))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (logged - ema_sum).abs() < 1e-9,
            "{}: images saw weights summing to {logged}, the EMA sums to {ema_sum}",
            run.display()
        );
    }

    // Stopped at step 6 and resumed (each rank loading its share): the uninterrupted run's.
    let resumed = tmp.path().join("resumed");
    two_ranks(&resumed, &format!("{zero};train.steps=6"), None, 6);
    two_ranks(&resumed, &zero, Some("auto"), 12);
    assert_same_checkpoints(&sharded, &resumed, "after resuming");
    // The sharded checkpoint is an ordinary one: a single process resumes it.
    let single = tmp.path().join("single");
    let six = resumed.join("checkpoints/step-000000006");
    assert!(six.is_dir(), "the step-6 checkpoint is kept");
    let saved_by = |ck: &Path| {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ck.join("meta.json")).unwrap()).unwrap();
        meta["world_size"].as_u64()
    };
    assert_eq!(saved_by(&six), Some(2));
    // Resumed on another world size, the run says what does not carry over exactly.
    let note = world_size_note(Some(2), 1).expect("a note for 2 -> 1");
    assert!(note.contains("1 process(es) a run that 2 saved") && note.contains("data position"));
    assert_eq!(world_size_note(Some(2), 2), None);
    assert_eq!(
        world_size_note(None, 1),
        None,
        "older checkpoints say nothing"
    );
    let summary = run(&single, 32, &[], Some(six.to_str().unwrap()));
    assert_eq!(summary.final_step, 12);
    assert_eq!(
        saved_by(&single.join("checkpoints/step-000000012")),
        Some(1)
    );
    let (a, b) = (
        weights(&sharded, "model.safetensors"),
        weights(&single, "model.safetensors"),
    );
    for (k, t) in &a {
        let d = max_abs_diff(t, &b[k]);
        assert!(d < 1e-5, "`{k}` differs by {d} resumed in one process");
    }
}

#[test]
fn sigterm_to_one_rank_stops_both_after_the_same_step_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let zero = "distributed.shard_optimizer=true";
    let whole = tmp.path().join("whole");
    two_ranks(&whole, zero, None, 12);
    // Rank 1 is signalled during step 4: both finish step 4, rank 0 saves it, both return.
    let stopped = tmp.path().join("stopped");
    let outputs = two_ranks_with(&stopped, zero, None, 5, &[("UNCLIP_TEST_SIGTERM_AT", "4")]);
    assert!(outputs[1].contains("stopped by SIGTERM"), "{}", outputs[1]);
    assert!(
        outputs[0].contains("stopped by another rank's signal"),
        "{}",
        outputs[0]
    );
    assert!(stopped.join("checkpoints/step-000000005").is_dir());
    two_ranks(&stopped, zero, Some("auto"), 12);
    assert_same_checkpoints(&whole, &stopped, "after the stop and resume");
}

#[test]
fn gradient_buckets_sent_during_backward_give_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let overlapped = tmp.path().join("overlapped");
    // Buckets of ~200 bytes: several, every one sent from backward's hooks.
    let small = "distributed.bucket_mb=0.0002;distributed.grad_reduce=during_backward";
    let log = two_ranks(&overlapped, small, None, 12);
    let line = log
        .lines()
        .find(|l| l.contains("started during backward"))
        .unwrap_or_else(|| panic!("rank 0 says how the gradients were averaged:\n{log}"));
    let counts = line.split(", at most").next().unwrap_or(line);
    let numbers: Vec<usize> = counts
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        numbers.len() == 2 && numbers[0] > 1 && numbers[1] == numbers[0],
        "{line}"
    );
    assert!(
        !log.contains("after its bucket had been sent"),
        "no step fell back to averaging after backward:\n{log}"
    );
    let after = tmp.path().join("after");
    two_ranks(
        &after,
        &format!("{small};distributed.grad_reduce=after_backward"),
        None,
        12,
    );
    assert_same_checkpoints(
        &overlapped,
        &after,
        "when the buckets are sent after backward",
    );
}

#[test]
fn sam_over_two_ranks_with_buckets_sent_during_backward_matches_one_process() {
    // Both of SAM's backward passes are averaged over the ranks from backward's hooks.
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    run(&single, 32, &["train.sam_rho=0.05".to_string()], None);
    let multi = tmp.path().join("multi");
    two_ranks(
        &multi,
        "train.sam_rho=0.05;distributed.bucket_mb=0.0002;distributed.grad_reduce=during_backward",
        None,
        12,
    );
    assert_matches_one_process(&single, &multi);
}

#[test]
fn a_variable_accumulated_twice_per_backward_is_averaged_during_backward() {
    // fc1 in two activation-checkpointed blocks: its gradient accumulates once in each block's
    // recomputation, which the first step learns, so its bucket waits for both.
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    run_model(&single, 32, &[], None, true);
    let multi = tmp.path().join("multi");
    let log = two_ranks_with(
        &multi,
        "distributed.bucket_mb=0.0002;distributed.grad_reduce=during_backward",
        None,
        12,
        &[("UNCLIP_TEST_CHECKPOINTED", "1")],
    )
    .remove(0);
    assert!(
        log.contains("started during backward") && !log.contains("after its bucket had been sent"),
        "every step averaged during backward:\n{log}"
    );
    assert_matches_one_process(&single, &multi);
}

#[test]
fn bf16_gradient_averaging_trains_like_fp32_in_half_the_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let fp32 = tmp.path().join("fp32");
    two_ranks(&fp32, "", None, 12);
    let bf16 = tmp.path().join("bf16");
    two_ranks(&bf16, "distributed.reduce_dtype=bf16", None, 12);
    let (a, b) = (
        weights(&fp32, "model.safetensors"),
        weights(&bf16, "model.safetensors"),
    );
    let mut largest = 0.0f64;
    for (k, t) in &a {
        let d = max_abs_diff(t, &b[k]);
        let scale = t.abs().max().double_value(&[]);
        assert!(
            d <= 2e-2 * scale.max(1.0),
            "`{k}` moved {d} with bf16 gradients"
        );
        largest = largest.max(d);
    }
    // bfloat16 keeps 8 bits of mantissa: the gradients really travelled rounded.
    assert!(
        largest > 0.0,
        "bf16 averaging left the weights bit-identical"
    );
}

/// ZeRO-2: gradients, optimiser state and EMA sharded over the ranks.
const ZERO2: &str = "distributed.shard_optimizer=true;distributed.shard_gradients=true";

#[test]
fn sharded_gradients_give_the_same_run_during_or_after_backward_and_with_sam() {
    let tmp = tempfile::tempdir().unwrap();
    // Buckets of ~200 bytes, so each rank owns several and sends the other's from the hooks; one
    // micro-batch a step (over several, the sums run in another order: below).
    let small = "distributed.bucket_mb=0.0002;logging.images_every=12;train.grad_accum=1";
    let plain = tmp.path().join("plain");
    two_ranks(&plain, small, None, 12);
    let sharded = tmp.path().join("sharded");
    let log = two_ranks(&sharded, &format!("{small};{ZERO2}"), None, 12);
    assert!(
        log.contains("ZeRO-2")
            && log.contains("first step: gradients sent to their owners in")
            && log.contains("started during backward"),
        "rank 0 says it shards the gradients, sent during backward from the first step:\n{log}"
    );
    // The owners' averages, the norm summed over the ranks (clipping is on) and the owners'
    // updates: the unsharded run's, bit for bit, and its EMA sampled by rank 0.
    assert_same_checkpoints(&plain, &sharded, "with sharded gradients");
    let read = |run: &Path| std::fs::read_to_string(run.join("images-12.txt")).unwrap();
    assert_eq!(read(&plain), read(&sharded));
    let after = tmp.path().join("after");
    let after_backward = format!("{small};{ZERO2};distributed.grad_reduce=after_backward");
    two_ranks(&after, &after_backward, None, 12);
    assert_same_checkpoints(&plain, &after, "with sharded gradients sent after backward");

    // SAM: the owners perturb their variables and share them; when the perturbed pass goes
    // non-finite at step 5, they share them again, restored, as no update follows.
    let sam = "train.sam_rho=0.05";
    let nan = [("UNCLIP_TEST_SAM_NAN_AT", "5")];
    let plain_sam = tmp.path().join("plain-sam");
    let log = two_ranks_with(&plain_sam, &format!("{small};{sam}"), None, 12, &nan).remove(0);
    assert!(log.contains("step 5: non-finite"), "{log}");
    let sharded_sam = tmp.path().join("sharded-sam");
    two_ranks_with(
        &sharded_sam,
        &format!("{small};{ZERO2};{sam}"),
        None,
        12,
        &nan,
    );
    assert_same_checkpoints(&plain_sam, &sharded_sam, "with SAM and sharded gradients");
}

#[test]
fn sharded_gradients_of_a_layer_accumulated_twice_per_backward() {
    // fc1 in two activation-checkpointed blocks accumulates twice per backward: ZeRO-2's first
    // step sends fc1's second gradient to its owner after backward and learns the two, later
    // steps wait for both before sending fc1's bucket — during or after backward, as one process
    // trains.
    let tmp = tempfile::tempdir().unwrap();
    let twice = [("UNCLIP_TEST_CHECKPOINTED", "1")];
    let single = tmp.path().join("single");
    run_model(&single, 32, &[], None, true);
    for grad_reduce in ["during_backward", "after_backward"] {
        let multi = tmp.path().join(grad_reduce);
        let overrides =
            format!("distributed.bucket_mb=0.0002;{ZERO2};distributed.grad_reduce={grad_reduce}");
        let log = two_ranks_with(&multi, &overrides, None, 12, &twice).remove(0);
        assert!(!log.contains("after its bucket had been sent"), "{log}");
        assert_matches_one_process(&single, &multi);
    }
}

#[test]
fn sharded_gradients_are_reduced_after_every_micro_batch() {
    // Two micro-batches a step (the config's): under ZeRO-2 each is reduced to the owners as it
    // comes, so the owners sum the ranks' gradients micro-batch by micro-batch rather than each
    // rank its own first — the same run to rounding, and not bit for bit.
    let tmp = tempfile::tempdir().unwrap();
    let small = "distributed.bucket_mb=0.0002";
    let plain = tmp.path().join("plain");
    two_ranks(&plain, small, None, 12);
    for (name, extra) in [
        ("during", ""),
        ("after", ";distributed.grad_reduce=after_backward"),
        ("sam", ";train.sam_rho=0.05"),
    ] {
        let reference = if name == "sam" {
            let dir = tmp.path().join("plain-sam");
            two_ranks(&dir, &format!("{small};train.sam_rho=0.05"), None, 12);
            dir
        } else {
            plain.clone()
        };
        let sharded = tmp.path().join(name);
        two_ranks(&sharded, &format!("{small};{ZERO2}{extra}"), None, 12);
        assert_close_checkpoints(&reference, &sharded, &format!("with ZeRO-2 ({name})"));
        let (a, b) = (
            weights(&reference, "model.safetensors"),
            weights(&sharded, "model.safetensors"),
        );
        assert!(
            a.iter().any(|(k, t)| !t.equal(&b[k])),
            "{name}: bit-identical, so the micro-batches were not reduced one by one"
        );
    }
}
