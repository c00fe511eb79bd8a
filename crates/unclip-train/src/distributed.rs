//! Data parallelism over c10d: the group from the torchrun environment (Gloo on CPU, NCCL on
//! CUDA), rank 0's weights broadcast at start, gradients averaged in buckets during backward.

use crate::config::{DistributedConfig, GradReduce, ReduceDtype};
use crate::optim::AdamW;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::time::Duration;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use unclip_diffusion::device::parse_device;
use unclip_dist::{DistEnv, GradReducer, ProcessGroup, Reduced, ReducerOptions};

/// This process's device for `spec` (`auto | cpu | cuda | cuda:N`): in a multi-process CUDA
/// job, `auto` and `cuda` mean the GPU of this rank's LOCAL_RANK, as torchrun jobs expect.
pub fn process_device(spec: &str) -> Result<Device> {
    let device = parse_device(spec).map_err(|e| anyhow!("device: {e}"))?;
    let env = DistEnv::from_env()?;
    match (device, env) {
        (Device::Cuda(_), Some(env))
            if env.world_size > 1 && (spec == "auto" || spec == "cuda") =>
        {
            let visible = tch::Cuda::device_count() as usize;
            if env.local_rank >= visible {
                bail!(
                    "LOCAL_RANK {} has no GPU: {visible} CUDA device(s) are visible (launch at most \
                     {visible} processes per node)",
                    env.local_rank
                );
            }
            Ok(Device::Cuda(env.local_rank))
        }
        (device, _) => Ok(device),
    }
}

/// The process group when launched with WORLD_SIZE > 1 (None: a single process): Gloo for a
/// CPU model, NCCL on the model's GPU for a CUDA one.
pub fn group_from_env(cfg: &DistributedConfig, device: Device) -> Result<Option<ProcessGroup>> {
    let Some(env) = DistEnv::from_env()? else {
        return Ok(None);
    };
    if env.world_size == 1 {
        return Ok(None);
    }
    if device == Device::Cpu {
        let omp = std::env::var("OMP_NUM_THREADS").ok();
        let local = std::env::var("LOCAL_WORLD_SIZE").ok();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(n) =
            cpu_threads_per_rank(omp.as_deref(), local.as_deref(), env.world_size, cores)
        {
            tch::set_num_threads(n as i32);
            if env.rank == 0 {
                eprintln!(
                    "OMP_NUM_THREADS unset: {n} intra-op thread(s) per rank ({cores} cores shared \
                     by the node's ranks)"
                );
            }
        }
    }
    let timeout = Duration::from_secs(cfg.timeout_secs);
    let pg = match device {
        Device::Cpu => ProcessGroup::gloo(&env, timeout),
        Device::Cuda(index) => ProcessGroup::nccl(&env, timeout, index),
        other => bail!("data-parallel training runs on cpu (Gloo) or cuda (NCCL), not {other:?}"),
    }
    .with_context(|| {
        format!(
            "joining rank {} of {} at {}:{}",
            env.rank, env.world_size, env.master_addr, env.master_port
        )
    })?;
    Ok(Some(pg))
}

/// Intra-op threads for each CPU rank when OMP_NUM_THREADS is unset (None: it is set, and
/// stands): the node's cores shared out among its ranks (LOCAL_WORLD_SIZE, or all of WORLD_SIZE
/// without it). Otherwise every rank takes a thread per core, and ranks sharing cores spin
/// against each other (the shapes decoder on two cores: 9–18 images/s against 54–62). torchrun
/// sets OMP_NUM_THREADS=1 itself.
pub fn cpu_threads_per_rank(
    omp_num_threads: Option<&str>,
    local_world_size: Option<&str>,
    world_size: usize,
    cores: usize,
) -> Option<usize> {
    if omp_num_threads.is_some_and(|v| !v.is_empty()) {
        return None;
    }
    let local = local_world_size
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(world_size)
        .max(1);
    Some((cores / local).max(1))
}

/// Every rank takes rank 0's values of every variable.
pub fn broadcast_variables(pg: &ProcessGroup, vs: &VarStore) -> Result<()> {
    tch::no_grad(|| {
        for (name, var) in &crate::named_variables(vs) {
            let mut t = var.shallow_clone();
            pg.broadcast(&mut t, 0)
                .with_context(|| format!("broadcasting `{name}`"))?;
        }
        Ok(())
    })
}

/// The trainer's gradient averaging: c10d buckets of at most `distributed.bucket_mb`, travelling
/// as `distributed.reduce_dtype`, started during or after backward as `distributed.grad_reduce`
/// says.
pub struct GradientAverager<'a> {
    reducer: GradReducer<'a>,
    overlap: bool,
    /// ZeRO-2: gradients go to their owners after every micro-batch's backward.
    sharded: bool,
    /// Steps whose overlapped averages were dropped and redone (a gradient came in late).
    pub late_steps: u64,
    /// What the last average saw.
    pub last: Option<Reduced>,
    /// Seconds spent in [`GradientAverager::average`] since the last
    /// [`GradientAverager::take_wait_secs`].
    wait_secs: f64,
}

impl<'a> GradientAverager<'a> {
    /// `owners` (ZeRO-2): each variable's rank, which alone keeps its average. `vs` holds the
    /// variables: the order they were created in gives the order their gradients are expected in
    /// where the loss's graph does not ([`GradientAverager::expect_gradients_of`]).
    pub fn new(
        pg: &'a ProcessGroup,
        vs: &VarStore,
        vars: &[&Tensor],
        cfg: &DistributedConfig,
        owners: Option<Vec<usize>>,
    ) -> Result<Self> {
        let sharded = owners.is_some();
        let options = ReducerOptions {
            bucket_bytes: cfg.bucket_bytes(),
            bf16: cfg.reduce_dtype == ReduceDtype::Bf16,
            bucket_views: true,
            owners,
            expected_order: Some(expected_gradient_order(vs, vars)),
        };
        Ok(Self {
            reducer: GradReducer::new(pg, vars.iter().copied(), &options)
                .context("setting up gradient averaging")?,
            overlap: cfg.grad_reduce == GradReduce::DuringBackward,
            sharded,
            late_steps: 0,
            last: None,
            wait_secs: 0.0,
        })
    }

    /// Whether buckets start during backward.
    pub fn overlaps(&self) -> bool {
        self.overlap
    }

    /// Whether gradients are reduced after every micro-batch (ZeRO-2), not only the last.
    pub fn every_micro_batch(&self) -> bool {
        self.sharded
    }

    /// Before a backward whose gradients are to be averaged: a step's last micro-batch (`last`),
    /// or under ZeRO-2 each of them.
    pub fn arm(&self, last: bool) -> Result<()> {
        Ok(self.reducer.arm_backward(self.overlap, last)?)
    }

    /// Between an armed step's forward and backward: under ZeRO-2 the first step's buckets follow
    /// the order `loss`'s graph will give the gradients in (see
    /// [`GradReducer::expect_gradients_of`]); every rank calls it.
    pub fn expect_gradients_of(&self, loss: &Tensor) -> Result<()> {
        Ok(self.reducer.expect_gradients_of(loss)?)
    }

    /// After it: every variable's gradient is the mean over ranks — under ZeRO-2 on its owner
    /// alone, and until the last micro-batch the sum so far (every rank calls this, also one
    /// whose non-finite loss skipped backward, so the collectives match).
    pub fn average(&mut self) -> Result<()> {
        let start = std::time::Instant::now();
        let reduced = self.reducer.wait().context("averaging gradients")?;
        if reduced.late {
            // A variable accumulated more often than at the first step (a changing graph): the
            // averages miss part of it, so average the untouched gradients again, after backward.
            self.reducer.finish(false)?;
            self.reducer.arm(false)?;
            self.reducer.wait().context("averaging gradients")?;
            self.late_steps += 1;
        }
        self.reducer.finish(true).context("averaging gradients")?;
        self.last = Some(reduced);
        self.wait_secs += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// The seconds averaging took since the last call (SAM's second average included).
    pub fn take_wait_secs(&mut self) -> f64 {
        std::mem::take(&mut self.wait_secs)
    }
}

/// Indices of `vars` (variables of `vs`) in the order backward is expected to give their
/// gradients: the last created first, as DDP assumes — a model mostly builds its modules in the
/// order its forward pass uses them, so a name order would misplace, say, a time embedding that
/// every block reads (its gradient is among the last to arrive). Not always (the decoder builds
/// its text projection after the UNet, and uses it first): ZeRO-2's first step orders the
/// variables its loss's graph shows by the graph, and this places the rest (inside activation
/// checkpoints). Variables `vs` does not list go last.
pub fn expected_gradient_order(vs: &VarStore, vars: &[&Tensor]) -> Vec<usize> {
    let created: HashMap<usize, usize> = vs
        .trainable_variables()
        .iter()
        .enumerate()
        .map(|(k, t)| (t.data_ptr() as usize, k))
        .collect();
    let mut order: Vec<usize> = (0..vars.len()).collect();
    // Stable: variables sharing no known position keep their (name) order among themselves.
    order.sort_by_key(|&i| {
        std::cmp::Reverse(
            created
                .get(&(vars[i].data_ptr() as usize))
                .map_or(0, |&k| k + 1),
        )
    });
    order
}

/// The global L2 norm of gradients sharded over the ranks (ZeRO-2: each on its owner alone),
/// bit for bit what [`AdamW::grad_norm`] gives over the whole set on one rank: the ranks' per-
/// variable norms, summed (each is nonzero on one rank only, so exactly), then the norm of those
/// of the gradients that exist, in name order.
pub fn sharded_grad_norm(pg: &ProcessGroup, opt: &AdamW) -> Result<f64> {
    let mut parts = opt.gradient_norm_parts()?;
    pg.all_reduce_sum(&mut parts)
        .context("summing the gradient norms over ranks")?;
    let n = parts.size()[0] / 2;
    let defined = parts.narrow(0, n, n).gt(0.0);
    let norms = parts.narrow(0, 0, n).masked_select(&defined);
    Ok(norms.to_kind(Kind::Double).norm().double_value(&[]))
}

/// Means of `values` over ranks (identity without a group).
pub fn mean_over_ranks(pg: Option<&ProcessGroup>, values: &[f64]) -> Result<Vec<f64>> {
    let Some(pg) = pg else {
        return Ok(values.to_vec());
    };
    let mut t = Tensor::from_slice(values).to_device(pg.device());
    pg.all_reduce_mean(&mut t)?;
    Ok(Vec::<f64>::try_from(&t.to_device(Device::Cpu))?)
}

/// Means over ranks of a task's named metrics. When the ranks' key sets differ (a metric a rank
/// did not see this interval), each rank keeps its own values rather than mixing keys.
pub fn mean_metrics(
    pg: Option<&ProcessGroup>,
    local: Vec<(String, f64)>,
) -> Result<Vec<(String, f64)>> {
    let Some(pg) = pg else { return Ok(local) };
    // FNV-1a over the sorted key names, exact in an f64.
    let mut hash = 0x811c_9dc5u32;
    for (k, _) in &local {
        for byte in k.bytes().chain([0]) {
            hash = (hash ^ byte as u32).wrapping_mul(0x0100_0193);
        }
    }
    // Every rank sees every rank's (count, hash) and so takes the same branch.
    let all = pg
        .all_gather(&Tensor::from_slice(&[local.len() as f64, hash as f64]).to_device(pg.device()))
        .context("comparing metric names")?
        .to_device(Device::Cpu);
    if all
        .eq_tensor(&all.get(0).unsqueeze(0))
        .all()
        .int64_value(&[])
        == 0
    {
        return Ok(local);
    }
    let values: Vec<f64> = local.iter().map(|(_, v)| *v).collect();
    let means = mean_over_ranks(Some(pg), &values)?;
    Ok(local
        .into_iter()
        .zip(means)
        .map(|((k, _), m)| (k, m))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::{cpu_threads_per_rank, expected_gradient_order};
    use tch::nn::VarStore;
    use unclip_diffusion::toy::ToyDenoiser;

    #[test]
    fn gradients_are_expected_last_created_first_not_in_name_order() {
        let vs = VarStore::new(tch::Device::Cpu);
        let _model = ToyDenoiser::new(vs.root() / "denoiser", 8, 2, 2);
        let named = crate::named_variables(&vs);
        let vars: Vec<&tch::Tensor> = named.iter().map(|(_, v)| v).collect();
        let order: Vec<&str> = expected_gradient_order(&vs, &vars)
            .into_iter()
            .map(|i| named[i].0.as_str())
            .collect();
        // Built input, time embedding, layers, output: backward meets the output first and the
        // time embedding, which every layer reads, last — where the name order has it first.
        let position = |name: &str| order.iter().position(|n| *n == name).unwrap();
        assert_eq!(order.len(), named.len());
        assert!(order[0].starts_with("denoiser.output."), "{order:?}");
        assert!(position("denoiser.layers.1.weight") < position("denoiser.layers.0.weight"));
        assert!(position("denoiser.layers.0.weight") < position("denoiser.input.weight"));
        let time = order
            .iter()
            .position(|n| n.starts_with("denoiser.time_embedding."))
            .unwrap();
        assert!(time > position("denoiser.layers.0.weight"), "{order:?}");
    }

    #[test]
    fn cpu_ranks_share_the_cores_unless_omp_num_threads_says() {
        // The user's (or torchrun's) OMP_NUM_THREADS stands.
        assert_eq!(cpu_threads_per_rank(Some("3"), Some("2"), 2, 16), None);
        // The node's ranks (LOCAL_WORLD_SIZE) share its cores; without it, all of WORLD_SIZE.
        assert_eq!(cpu_threads_per_rank(None, Some("4"), 8, 16), Some(4));
        assert_eq!(cpu_threads_per_rank(None, None, 2, 2), Some(1));
        assert_eq!(cpu_threads_per_rank(Some(""), Some("x"), 3, 16), Some(5));
        // Never below one thread.
        assert_eq!(cpu_threads_per_rank(None, Some("8"), 8, 2), Some(1));
    }
}
