//! Mixed precision: autocast regions with bf16 (or fp16, with [`crate::loss_scale`]) compute and
//! fp32 master weights, the TF32 switch, and channels-last convolution weights. The loss is
//! computed under autocast; backward and the optimiser run outside it.

use serde::{Deserialize, Serialize};
use tch::Device;

extern "C" {
    fn unclip_autocast_enter(device: i32, dtype: i32) -> i32;
    fn unclip_autocast_exit(device: i32, prev: i32);
    fn unclip_set_tf32(enabled: bool);
    fn unclip_tf32_enabled() -> bool;
    fn unclip_to_channels_last(t: *mut std::ffi::c_void);
    fn unclip_is_channels_last(t: *const std::ffi::c_void) -> bool;
}

/// `train.precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in fp32.
    #[default]
    Fp32,
    /// Autocast to bfloat16 (CPU or CUDA); weights, optimiser state and loss stay fp32.
    Bf16,
    /// Autocast to float16 with fp32 master weights and dynamic loss scaling
    /// (`train.loss_scale`), for GPUs without fast bf16.
    Fp16,
}

/// Restores the previous autocast state when dropped (also on panic).
pub struct AutocastGuard {
    device: i32,
    prev: i32,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: pairs with the enter call that produced this guard.
        unsafe { unclip_autocast_exit(self.device, self.prev) }
    }
}

/// Enters an autocast region for `device` at `precision` (None for fp32: nothing to do).
pub fn autocast(device: Device, precision: Precision) -> Option<AutocastGuard> {
    if precision == Precision::Fp32 {
        return None;
    }
    let device = if device.is_cuda() { 1 } else { 0 };
    let dtype = if precision == Precision::Fp16 { 1 } else { 0 };
    // SAFETY: plain integers; the guard restores the state.
    let prev = unsafe { unclip_autocast_enter(device, dtype) };
    Some(AutocastGuard { device, prev })
}

/// Allows TF32 in CUDA matmuls and convolutions (no effect on CPU).
pub fn set_tf32(enabled: bool) {
    // SAFETY: sets two global flags.
    unsafe { unclip_set_tf32(enabled) }
}

pub fn tf32_enabled() -> bool {
    // SAFETY: reads two global flags.
    unsafe { unclip_tf32_enabled() }
}

/// Stores every 4-D variable of `vs` (convolution weights) channels-last, in place: convolutions
/// then run in NHWC, which CUDA's tensor-core kernels prefer (on CPU, GroupNorm's channels-last
/// kernels are slower: leave it off there). Values, names and shapes are unchanged.
pub fn to_channels_last(vs: &tch::nn::VarStore) {
    for (_, mut var) in vs.variables() {
        // SAFETY: a live tensor; the shim swaps its storage for a re-laid-out copy.
        unsafe { unclip_to_channels_last(var.as_mut_ptr() as *mut std::ffi::c_void) }
    }
}

/// Whether `t` is a 4-D tensor laid out channels-last (and not also plainly contiguous).
pub fn is_channels_last(t: &tch::Tensor) -> bool {
    // SAFETY: a live tensor, only read.
    unsafe { unclip_is_channels_last(t.as_ptr() as *const std::ffi::c_void) }
}
