//! PyTorch's multi-tensor optimiser ops, which libtch does not bind: fused AdamW (one pass over
//! each parameter on CPU, one multi-tensor kernel per launch on CUDA) and the `_foreach_` ops of
//! torch's foreach clipping and EMA — one call per list of tensors instead of a handful of ops
//! per tensor. Tensors of one call share a device and dtype; lists are of tensors or references.

use anyhow::{bail, Result};
use std::borrow::Borrow;
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Tensor;

type TensorPtr = *const c_void;

extern "C" {
    fn unclip_multi_tensor_last_error() -> *const c_char;
    fn unclip_fused_adamw(
        params: *const TensorPtr,
        grads: *const TensorPtr,
        exp_avgs: *const TensorPtr,
        exp_avg_sqs: *const TensorPtr,
        n: c_int,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> c_int;
    fn unclip_foreach_global_norm(ts: *const TensorPtr, n: c_int, out: *mut f64) -> c_int;
    fn unclip_foreach_norms(ts: *const TensorPtr, n: c_int, out: TensorPtr) -> c_int;
    fn unclip_foreach_mul_scalar_(ts: *const TensorPtr, n: c_int, factor: f64) -> c_int;
    fn unclip_foreach_zero_(ts: *const TensorPtr, n: c_int) -> c_int;
    fn unclip_foreach_lerp_scalar_(
        selfs: *const TensorPtr,
        ends: *const TensorPtr,
        n: c_int,
        weight: f64,
    ) -> c_int;
}

fn pointers(ts: &[impl Borrow<Tensor>]) -> Vec<TensorPtr> {
    ts.iter()
        .map(|t| t.borrow().as_ptr() as TensorPtr)
        .collect()
}

fn count<T>(ts: &[T]) -> Result<c_int> {
    c_int::try_from(ts.len()).map_err(|_| anyhow::anyhow!("{} tensors in one call", ts.len()))
}

fn checked(rc: c_int, op: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the shim's thread-local message, valid until its next call on this thread.
    let message = unsafe { CStr::from_ptr(unclip_multi_tensor_last_error()) }
        .to_string_lossy()
        .into_owned();
    bail!("{op}: {message}")
}

/// AdamW's hyperparameters for one [`fused_adamw`] call.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// The optimiser step being taken, counted from 1 (bias corrections).
    pub step: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// `torch._fused_adamw_`: decoupled weight decay, moments and parameter update of every
/// parameter in place, as `torch.optim.AdamW(fused=True)`.
pub fn fused_adamw(
    params: &[impl Borrow<Tensor>],
    grads: &[impl Borrow<Tensor>],
    exp_avgs: &[impl Borrow<Tensor>],
    exp_avg_sqs: &[impl Borrow<Tensor>],
    hp: AdamWStep,
) -> Result<()> {
    let n = count(params)?;
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len()]
        .iter()
        .any(|&l| l != params.len())
    {
        bail!("fused AdamW: lists of unequal length");
    }
    let (p, g, m, v) = (
        pointers(params),
        pointers(grads),
        pointers(exp_avgs),
        pointers(exp_avg_sqs),
    );
    // SAFETY: n live tensors in each list; the shim updates params and moments in place.
    let rc = unsafe {
        unclip_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            hp.step as f64,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.weight_decay,
            hp.eps,
        )
    };
    checked(rc, "fused AdamW")
}

/// The L2 norm of the tensors' L2 norms (each computed in its own dtype), read back once.
pub fn global_norm(ts: &[impl Borrow<Tensor>]) -> Result<f64> {
    let (n, p) = (count(ts)?, pointers(ts));
    let mut out = 0.0f64;
    // SAFETY: n live tensors, only read; `out` is a valid f64.
    checked(
        unsafe { unclip_foreach_global_norm(p.as_ptr(), n, &mut out) },
        "gradient norm",
    )?;
    Ok(out)
}

/// Each tensor's L2 norm, as [`global_norm`] computes them (in the first tensor's dtype, on its
/// device; empty for no tensors).
pub fn norms(ts: &[impl Borrow<Tensor>]) -> Result<Tensor> {
    let Some(first) = ts.first() else {
        return Ok(Tensor::zeros([0], (tch::Kind::Float, tch::Device::Cpu)));
    };
    let first = first.borrow();
    let out = Tensor::empty([ts.len() as i64], (first.kind(), first.device()));
    let (n, p) = (count(ts)?, pointers(ts));
    // SAFETY: n live tensors, only read; `out` a live tensor of n elements, written in place.
    checked(
        unsafe { unclip_foreach_norms(p.as_ptr(), n, out.as_ptr() as TensorPtr) },
        "gradient norms",
    )?;
    Ok(out)
}

/// Multiplies every tensor by `factor` in place.
pub fn mul_(ts: &[impl Borrow<Tensor>], factor: f64) -> Result<()> {
    let (n, p) = (count(ts)?, pointers(ts));
    // SAFETY: n live tensors, scaled in place.
    checked(
        unsafe { unclip_foreach_mul_scalar_(p.as_ptr(), n, factor) },
        "scaling tensors",
    )
}

/// Sets every tensor to zero in place.
pub fn zero_(ts: &[impl Borrow<Tensor>]) -> Result<()> {
    let (n, p) = (count(ts)?, pointers(ts));
    // SAFETY: n live tensors, zeroed in place.
    checked(
        unsafe { unclip_foreach_zero_(p.as_ptr(), n) },
        "zeroing tensors",
    )
}

/// `selfs[i] += weight · (ends[i] − selfs[i])` in place.
pub fn lerp_(
    selfs: &[impl Borrow<Tensor>],
    ends: &[impl Borrow<Tensor>],
    weight: f64,
) -> Result<()> {
    let n = count(selfs)?;
    if ends.len() != selfs.len() {
        bail!("lerp: lists of unequal length");
    }
    let (s, e) = (pointers(selfs), pointers(ends));
    // SAFETY: n live tensors in each list; `selfs` updated in place, `ends` only read.
    checked(
        unsafe { unclip_foreach_lerp_scalar_(s.as_ptr(), e.as_ptr(), n, weight) },
        "multi-tensor lerp",
    )
}
