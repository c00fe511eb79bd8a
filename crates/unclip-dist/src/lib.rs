//! Data-parallel training on PyTorch's own distributed engine (c10d), through a thin C++ shim:
//! TCPStore rendezvous, and ProcessGroupGloo (CPU tensors) or ProcessGroupNCCL (CUDA tensors;
//! in builds against a CUDA libtorch) collectives: broadcast, all-reduce, all-gather, barrier; and
//! [`GradReducer`], gradients averaged in buckets from backward's hooks, as DDP's Reducer (or, under
//! ZeRO-2, reduced to the rank that owns them).
//! Launched like PyTorch jobs: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`
//! from the environment (torchrun, SLURM wrappers); none set means one process.

pub mod launch;

use std::ffi::{c_char, c_int, c_long, c_void, CStr, CString};
use std::marker::PhantomData;
use std::time::Duration;
use tch::Tensor;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DistError {
    #[error("environment variable {name}: {reason}")]
    Env { name: &'static str, reason: String },
    #[error("c10d {op}: {message}")]
    C10d { op: &'static str, message: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, DistError>;

mod ffi {
    use super::*;
    extern "C" {
        pub fn unclip_c10d_last_error() -> *const c_char;
        pub fn unclip_c10d_has_nccl() -> c_int;
        /// Gloo when `cuda_device` < 0, else NCCL on that device.
        pub fn unclip_c10d_init(
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            timeout_ms: c_long,
            cuda_device: c_int,
        ) -> *mut c_void;
        pub fn unclip_c10d_free(group: *mut c_void);
        pub fn unclip_c10d_all_reduce(group: *mut c_void, t: *mut c_void, op: c_int) -> c_int;
        pub fn unclip_c10d_broadcast(group: *mut c_void, t: *mut c_void, root: c_int) -> c_int;
        pub fn unclip_c10d_all_gather(
            group: *mut c_void,
            out: *mut c_void,
            input: *mut c_void,
        ) -> c_int;
        pub fn unclip_c10d_barrier(group: *mut c_void) -> c_int;
        pub fn unclip_c10d_reducer_new(
            group: *mut c_void,
            vars: *const *mut c_void,
            n: i64,
            bucket_bytes: i64,
            bf16: c_int,
            views: c_int,
            owners: *const i64,
            order: *const i64,
        ) -> *mut c_void;
        pub fn unclip_c10d_reducer_free(reducer: *mut c_void);
        pub fn unclip_c10d_reducer_arm(reducer: *mut c_void, overlap: c_int, last: c_int) -> c_int;
        pub fn unclip_c10d_reducer_wait(
            reducer: *mut c_void,
            late: *mut c_int,
            started: *mut i64,
            buckets: *mut i64,
            peak_waiting: *mut i64,
        ) -> c_int;
        pub fn unclip_c10d_reducer_predict(reducer: *mut c_void, loss: *const c_void) -> c_int;
        pub fn unclip_c10d_reducer_finish(reducer: *mut c_void, copy: c_int) -> c_int;
    }
}

/// Where this process stands in the job, as torchrun describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

fn parse<T: std::str::FromStr>(name: &'static str, value: &str) -> Result<T> {
    value.parse().map_err(|_| DistError::Env {
        name,
        reason: format!("`{value}` is not a valid number"),
    })
}

impl DistEnv {
    /// None when neither RANK nor WORLD_SIZE is set (a single process, no c10d).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] over any variable lookup.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let var = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let (rank, world) = (var("RANK"), var("WORLD_SIZE"));
        let (rank, world) = match (rank, world) {
            (None, None) => return Ok(None),
            (Some(r), Some(w)) => (
                parse::<usize>("RANK", &r)?,
                parse::<usize>("WORLD_SIZE", &w)?,
            ),
            (None, Some(_)) => {
                return Err(DistError::Env {
                    name: "RANK",
                    reason: "unset while WORLD_SIZE is set".into(),
                })
            }
            (Some(_), None) => {
                return Err(DistError::Env {
                    name: "WORLD_SIZE",
                    reason: "unset while RANK is set".into(),
                })
            }
        };
        if world == 0 || rank >= world {
            return Err(DistError::Env {
                name: "RANK",
                reason: format!("{rank} is not below WORLD_SIZE {world}"),
            });
        }
        let local_rank = var("LOCAL_RANK")
            .map(|v| parse("LOCAL_RANK", &v))
            .transpose()?
            .unwrap_or(rank);
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = var("MASTER_PORT")
            .map(|v| parse("MASTER_PORT", &v))
            .transpose()?
            .unwrap_or(29500);
        Ok(Some(Self {
            rank,
            world_size: world,
            local_rank,
            master_addr,
            master_port,
        }))
    }
}

/// Whether this build's shim has the NCCL backend (compiled against a CUDA libtorch with CUDA and
/// NCCL headers at hand).
pub fn nccl_available() -> bool {
    // SAFETY: no arguments, returns a constant.
    unsafe { ffi::unclip_c10d_has_nccl() != 0 }
}

/// A c10d process group: Gloo over CPU tensors or NCCL over one CUDA device's tensors.
pub struct ProcessGroup {
    ptr: *mut c_void,
    rank: usize,
    world_size: usize,
    /// The device whose tensors the collectives take.
    device: tch::Device,
}

// SAFETY: c10d process groups are thread-safe; the handle is only freed in Drop.
unsafe impl Send for ProcessGroup {}

fn last_error(op: &'static str) -> DistError {
    // SAFETY: the shim returns a pointer to a thread-local NUL-terminated string.
    let message = unsafe { CStr::from_ptr(ffi::unclip_c10d_last_error()) }
        .to_string_lossy()
        .into_owned();
    DistError::C10d { op, message }
}

fn check(op: &'static str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error(op))
    }
}

impl ProcessGroup {
    /// Rendezvous at `env.master_addr:master_port` and build a Gloo group. `timeout` bounds the
    /// rendezvous and every collective: a dead peer becomes an error, not a hang.
    pub fn gloo(env: &DistEnv, timeout: Duration) -> Result<Self> {
        Self::init(env, timeout, tch::Device::Cpu)
    }

    /// Rendezvous as [`ProcessGroup::gloo`], then an NCCL group over CUDA device `device_index`
    /// (one device per rank: torchrun's LOCAL_RANK). With `TORCH_NCCL_BLOCKING_WAIT` unset, NCCL's
    /// watchdog also ends a process whose collective outlives `timeout`.
    pub fn nccl(env: &DistEnv, timeout: Duration, device_index: usize) -> Result<Self> {
        if !nccl_available() {
            return Err(DistError::Invalid(
                "this build has no NCCL backend: build against a CUDA libtorch (scripts/setup.sh's \
                 PyPI wheel) with its CUDA and NCCL headers, or train on device: cpu (Gloo)"
                    .into(),
            ));
        }
        if device_index >= tch::Cuda::device_count() as usize {
            return Err(DistError::Invalid(format!(
                "rank {} wants CUDA device {device_index}, but {} are visible",
                env.rank,
                tch::Cuda::device_count()
            )));
        }
        Self::init(env, timeout, tch::Device::Cuda(device_index))
    }

    /// The rendezvous and a group over `device`'s tensors (Gloo for the CPU, NCCL for a GPU).
    fn init(env: &DistEnv, timeout: Duration, device: tch::Device) -> Result<Self> {
        let host = CString::new(env.master_addr.clone()).map_err(|_| DistError::Env {
            name: "MASTER_ADDR",
            reason: "contains NUL".into(),
        })?;
        let cuda_device = match device {
            tch::Device::Cuda(i) => i as c_int,
            _ => -1,
        };
        // SAFETY: valid C string and plain integers; null means failure.
        let ptr = unsafe {
            ffi::unclip_c10d_init(
                host.as_ptr(),
                env.master_port as c_int,
                env.rank as c_int,
                env.world_size as c_int,
                timeout.as_millis() as c_long,
                cuda_device,
            )
        };
        if ptr.is_null() {
            return Err(last_error("rendezvous"));
        }
        Ok(Self {
            ptr,
            rank: env.rank,
            world_size: env.world_size,
            device,
        })
    }

    /// The device whose tensors this group's collectives take.
    pub fn device(&self) -> tch::Device {
        self.device
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn check_device(&self, t: &Tensor) -> Result<()> {
        if t.device() != self.device {
            return Err(DistError::Invalid(format!(
                "this process group takes tensors on {:?}, got one on {:?}",
                self.device,
                t.device()
            )));
        }
        Ok(())
    }

    /// In-place sum over ranks.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        self.check_device(t)?;
        // SAFETY: live group and tensor pointers.
        check("all_reduce", unsafe {
            ffi::unclip_c10d_all_reduce(self.ptr, t.as_mut_ptr() as *mut c_void, 0)
        })
    }

    /// In-place mean over ranks.
    pub fn all_reduce_mean(&self, t: &mut Tensor) -> Result<()> {
        self.check_device(t)?;
        // SAFETY: live group and tensor pointers.
        check("all_reduce", unsafe {
            ffi::unclip_c10d_all_reduce(self.ptr, t.as_mut_ptr() as *mut c_void, 1)
        })
    }

    /// In place: every rank ends with `root`'s values.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.check_device(t)?;
        // SAFETY: live group and tensor pointers.
        check("broadcast", unsafe {
            ffi::unclip_c10d_broadcast(self.ptr, t.as_mut_ptr() as *mut c_void, root as c_int)
        })
    }

    /// [world_size, *t.shape]: every rank's `t`, in rank order.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.check_device(t)?;
        let mut shape = vec![self.world_size as i64];
        shape.extend(t.size());
        let mut out = Tensor::zeros(shape.as_slice(), (t.kind(), t.device()));
        let mut input = t.contiguous();
        // SAFETY: live group and tensor pointers; out is preallocated with the gathered shape.
        check("all_gather", unsafe {
            ffi::unclip_c10d_all_gather(
                self.ptr,
                out.as_mut_ptr() as *mut c_void,
                input.as_mut_ptr() as *mut c_void,
            )
        })?;
        Ok(out)
    }

    pub fn barrier(&self) -> Result<()> {
        // SAFETY: live group pointer.
        check("barrier", unsafe { ffi::unclip_c10d_barrier(self.ptr) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by unclip_c10d_init and freed once.
        unsafe { ffi::unclip_c10d_free(self.ptr) }
    }
}

/// What [`GradReducer::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reduced {
    /// On some rank a gradient arrived after its bucket had started, so the averages miss it:
    /// every rank drops them (`finish(false)`) and averages again. An overlapped step costs one
    /// more one-number all-reduce to agree on this.
    pub late: bool,
    /// Buckets started during backward (the overlap), of `buckets`.
    pub started_in_backward: usize,
    pub buckets: usize,
    /// During an overlapped backward, the most bytes of gradients that were complete but not yet
    /// sent at once: the buckets filling, and any gradients held behind an earlier bucket that
    /// still waited for a later one (where the buckets' order is not backward's). Zero otherwise.
    pub peak_waiting_bytes: usize,
}

/// Gradient buckets' default size: DDP's (`bucket_cap_mb` 25).
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// How a [`GradReducer`] buckets and sends the gradients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReducerOptions {
    /// Bucket size in bytes (the first at most 1 MiB, so communication starts early).
    pub bucket_bytes: usize,
    /// Buckets travel as bfloat16 (rounded, summed, widened back).
    pub bf16: bool,
    /// From the first overlapped step on, each gradient is a view into its fp32 bucket (when
    /// every variable is dense and its bucket's type), as DDP's `gradient_as_bucket_view`: no
    /// second copy of the gradients, none made per step — but a late gradient is then an error,
    /// as the buffers were averaged in place.
    pub bucket_views: bool,
    /// ZeRO-2: each variable's owner rank, which alone receives its average (buckets hold one
    /// owner's variables and are reduced to it); every other rank drops its gradient of the
    /// variable once the bucket is sent, so it ends undefined there — from the first overlapped
    /// step on, whose buckets follow the loss's graph ([`GradReducer::expect_gradients_of`]) or
    /// else `expected_order`; a gradient arriving after its bucket left is sent after backward at
    /// that step (a variable accumulated twice), an error at later ones. None: every rank keeps
    /// every average.
    pub owners: Option<Vec<usize>>,
    /// The order the gradients are expected to arrive in (indices into the variables), which
    /// buckets them until the first overlapped step has shown the real one — under ZeRO-2 that
    /// step's buckets go during backward, so a good guess keeps gradients from piling up (the
    /// loss's graph, where given, orders the variables it shows; this, the rest). None: last first
    /// (backward's order where variables are listed as the forward pass uses them).
    pub expected_order: Option<Vec<usize>>,
}

impl Default for ReducerOptions {
    fn default() -> Self {
        Self {
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            bf16: false,
            bucket_views: false,
            owners: None,
            expected_order: None,
        }
    }
}

/// Averages the gradients of a set of variables over a group, in buckets (DDP's Reducer, in
/// less). Armed before the backward whose gradients are to be averaged, it can start each bucket's
/// all-reduce from a hook on the variables' gradient accumulators as soon as the bucket's gradients
/// are in, so communication overlaps the rest of backward; the first overlapped backward fixes the
/// buckets in the order rank 0's gradients arrived. Buckets start in the same order on every rank
/// whatever order gradients arrive in, and [`GradReducer::wait`] starts any left (a variable no
/// rank used, or a rank that skipped backward), so the ranks' collectives always match. A
/// gradient defined on any rank comes out defined on all.
///
/// Use: [`arm`](GradReducer::arm), forward, under ZeRO-2
/// [`expect_gradients_of`](GradReducer::expect_gradients_of) the loss (the first step's buckets
/// then follow its graph), backward, [`wait`](GradReducer::wait), then
/// [`finish`](GradReducer::finish) with `copy = true` to write the averages into the gradients —
/// or, when `wait` reported a gradient that arrived after its bucket had started (a variable
/// accumulated more often than at the first step), `finish(false)` and a non-overlapped round
/// (`arm(false)`, `wait`, `finish(true)`): the gradients are untouched until `finish(true)`.
pub struct GradReducer<'a> {
    ptr: *mut c_void,
    _group: PhantomData<&'a ProcessGroup>,
}

impl<'a> GradReducer<'a> {
    /// A reducer over `vars` (on the group's device), bucketed and sent as `options` say.
    pub fn new<'v>(
        pg: &'a ProcessGroup,
        vars: impl IntoIterator<Item = &'v Tensor>,
        options: &ReducerOptions,
    ) -> Result<Self> {
        let vars: Vec<&Tensor> = vars.into_iter().collect();
        for v in &vars {
            pg.check_device(v)?;
        }
        let owners: Option<Vec<i64>> = match &options.owners {
            Some(o) if o.len() != vars.len() => {
                return Err(DistError::Invalid(format!(
                    "gradient reducer: {} owners for {} variables",
                    o.len(),
                    vars.len()
                )))
            }
            Some(o) => Some(o.iter().map(|&r| r as i64).collect()),
            None => None,
        };
        // (The shim checks it is a permutation.)
        let order: Option<Vec<i64>> = match &options.expected_order {
            Some(o) if o.len() != vars.len() => {
                return Err(DistError::Invalid(format!(
                    "gradient reducer: an expected order of {} for {} variables",
                    o.len(),
                    vars.len()
                )))
            }
            Some(o) => Some(o.iter().map(|&i| i as i64).collect()),
            None => None,
        };
        let ptrs: Vec<*mut c_void> = vars.iter().map(|v| v.as_ptr() as *mut c_void).collect();
        // SAFETY: live group and tensor pointers, `owners` and `order` (when given) one per
        // variable; the shim copies the tensors (sharing storage), the owners and the order.
        let ptr = unsafe {
            ffi::unclip_c10d_reducer_new(
                pg.ptr,
                ptrs.as_ptr(),
                ptrs.len() as i64,
                options.bucket_bytes as i64,
                c_int::from(options.bf16),
                c_int::from(options.bucket_views),
                owners.as_ref().map_or(std::ptr::null(), |o| o.as_ptr()),
                order.as_ref().map_or(std::ptr::null(), |o| o.as_ptr()),
            )
        };
        if ptr.is_null() {
            return Err(last_error("gradient reducer"));
        }
        Ok(Self {
            ptr,
            _group: PhantomData,
        })
    }

    /// Before the backward whose gradients are to be averaged: `overlap` starts buckets from
    /// backward's hooks, otherwise all start in [`GradReducer::wait`].
    pub fn arm(&self, overlap: bool) -> Result<()> {
        self.arm_backward(overlap, true)
    }

    /// Under ZeRO-2 (`owners`), before each of several backward passes whose gradients add up
    /// (micro-batches): each is reduced to the owners as it comes, so no rank accumulates the
    /// others' gradients; the owners keep the sums, which the next backward adds to, and divide
    /// them into means after the one armed with `last`. An unsharded reducer takes only `last`.
    pub fn arm_backward(&self, overlap: bool, last: bool) -> Result<()> {
        // SAFETY: live reducer.
        check("gradient reducer", unsafe {
            ffi::unclip_c10d_reducer_arm(self.ptr, c_int::from(overlap), c_int::from(last))
        })
    }

    /// Between the forward and the backward of the first overlapped step under ZeRO-2 (`owners`),
    /// on every rank: buckets that step by the order its gradients will arrive in, read off
    /// `loss`'s graph as autograd's engine walks it (rank 0's, for all), instead of
    /// [`ReducerOptions::expected_order`] — which still places the variables the graph does not
    /// show (used inside an activation checkpoint, or not at all). A no-op at other steps and
    /// after the step's first call (its later backward passes find the buckets fixed).
    pub fn expect_gradients_of(&self, loss: &Tensor) -> Result<()> {
        // SAFETY: live reducer and tensor.
        check("gradient reducer", unsafe {
            ffi::unclip_c10d_reducer_predict(self.ptr, loss.as_ptr() as *const c_void)
        })
    }

    /// After backward: starts the buckets not yet started and waits for all.
    pub fn wait(&self) -> Result<Reduced> {
        let (mut late, mut started, mut buckets, mut peak_waiting): (c_int, i64, i64, i64) =
            (0, 0, 0, 0);
        // SAFETY: live reducer, valid out pointers.
        check("gradient reducer", unsafe {
            ffi::unclip_c10d_reducer_wait(
                self.ptr,
                &mut late,
                &mut started,
                &mut buckets,
                &mut peak_waiting,
            )
        })?;
        Ok(Reduced {
            late: late != 0,
            started_in_backward: started as usize,
            buckets: buckets as usize,
            peak_waiting_bytes: peak_waiting as usize,
        })
    }

    /// Writes the averages into the gradients (`copy`), or drops them.
    pub fn finish(&self, copy: bool) -> Result<()> {
        // SAFETY: live reducer.
        check("gradient reducer", unsafe {
            ffi::unclip_c10d_reducer_finish(self.ptr, c_int::from(copy))
        })
    }
}

impl Drop for GradReducer<'_> {
    fn drop(&mut self) {
        // SAFETY: created by unclip_c10d_reducer_new and freed once.
        unsafe { ffi::unclip_c10d_reducer_free(self.ptr) }
    }
}
