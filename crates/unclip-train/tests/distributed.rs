//! Data-parallel training over Gloo on loopback: 2 ranks with half the batch each end with the
//! same weights as one process over the whole batch. This test binary re-runs itself as the ranks.
mod common;

use anyhow::Result;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};
use unclip_dist::launch::launch_local;
use unclip_train::config::{parse_config, Validate};
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
    mlp: nn::Sequential,
    x: Tensor,
    y: Tensor,
    batch: i64,
    rank: i64,
    world: i64,
}

impl Regression {
    fn new(vs: &nn::VarStore, batch: i64, rank: i64, world: i64) -> Self {
        let x = Tensor::linspace(-2.0, 2.0, 256 * 4, (Kind::Float, Device::Cpu))
            .view([256, 4])
            .sin()
            * 1.5;
        let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).view([4, 1]);
        let y = x.matmul(&w).sin();
        tch::manual_seed(11); // identical initial weights in every process (rank 0's are broadcast anyway)
        let p = vs.root();
        let mlp = nn::seq()
            .add(nn::linear(&p / "fc1", 4, 32, Default::default()))
            .add_fn(|t| t.tanh())
            .add(nn::linear(&p / "fc2", 32, 1, Default::default()));
        Self {
            mlp,
            x,
            y,
            batch,
            rank,
            world,
        }
    }
}

impl TrainTask for Regression {
    type Batch = (Tensor, Tensor);
    fn next_batch(&mut self, step: u64, micro: usize) -> Result<(Tensor, Tensor)> {
        let global = self.batch * self.world;
        let start = ((step as i64 * 2 + micro as i64) * global + self.rank * self.batch) % 256;
        Ok((
            self.x.narrow(0, start, self.batch),
            self.y.narrow(0, start, self.batch),
        ))
    }
    fn loss(&mut self, (x, y): &(Tensor, Tensor)) -> Result<StepOutput> {
        let loss = (self.mlp.forward(x) - y).square().mean(Kind::Float);
        // A metric that differs per rank: rank 0 must log its mean over ranks.
        let metrics = vec![("rank_id".to_string(), self.rank as f64)];
        Ok(StepOutput {
            loss,
            samples: self.batch as usize,
            metrics,
        })
    }
}

fn run(dir: &Path, batch: usize) -> unclip_train::TrainSummary {
    let cfg =
        parse_config::<NoTaskSections>(CONFIG, &[format!("train.batch_size={batch}")]).unwrap();
    let env = unclip_dist::DistEnv::from_env().unwrap();
    let (rank, world) = env.map_or((0, 1), |e| (e.rank as i64, e.world_size as i64));
    let vs = nn::VarStore::new(Device::Cpu);
    let mut task = Regression::new(&vs, batch as i64, rank, world);
    train(&mut task, &vs, &cfg.runtime, &cfg.resolved, dir, None).unwrap()
}

#[test]
#[ignore = "a rank of two_gloo_ranks_match_one_process"]
fn data_parallel_rank() {
    let Ok(dir) = std::env::var("UNCLIP_TEST_RUN_DIR") else {
        return;
    };
    let summary = run(Path::new(&dir), 16);
    println!("rank done at step {}", summary.final_step);
}

fn weights(dir: &Path, file: &str) -> HashMap<String, Tensor> {
    let ck = dir.join("checkpoints/step-000000012").join(file);
    Tensor::read_safetensors(&ck)
        .unwrap_or_else(|e| panic!("{}: {e}", ck.display()))
        .into_iter()
        .collect()
}

#[test]
fn two_gloo_ranks_match_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let losses = run(&single, 32).losses;
    assert!(
        losses.last().unwrap().1 < losses[0].1,
        "the regression learns: {losses:?}"
    );

    let multi = tmp.path().join("multi");
    let exe = std::env::current_exe().unwrap();
    let args = [
        "--exact",
        "data_parallel_rank",
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ];
    let env = [("UNCLIP_TEST_RUN_DIR", multi.to_str().unwrap())];
    let ranks = launch_local(&exe, &args, 2, &env, Duration::from_secs(120)).expect("ranks hang");
    for r in &ranks {
        assert!(
            r.success && r.output.contains("rank done at step 12"),
            "rank {} failed:\n{}",
            r.rank,
            r.output
        );
    }
    assert!(!multi.join("checkpoints").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));
    for file in [
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
    ] {
        let (a, b) = (weights(&single, file), weights(&multi, file));
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            let d = (t - &b[k]).abs().max().double_value(&[]);
            assert!(
                d < 1e-5,
                "{file}: `{k}` differs by {d} between 1 process and 2 ranks"
            );
        }
    }
    // Only rank 0 wrote logs, and they hold means over ranks.
    assert_eq!(
        std::fs::read_dir(multi.join("tensorboard"))
            .unwrap()
            .count(),
        1
    );
    let scalars = unclip_testkit::read_scalars(&multi.join("tensorboard"));
    assert_eq!(scalars[&("train/rank_id".to_string(), 12)], 0.5);
    let single_loss =
        unclip_testkit::read_scalars(&single.join("tensorboard"))[&("train/loss".to_string(), 12)];
    let multi_loss = scalars[&("train/loss".to_string(), 12)];
    assert!(
        (single_loss - multi_loss).abs() < 1e-5,
        "logged loss {single_loss} vs {multi_loss}"
    );
}
