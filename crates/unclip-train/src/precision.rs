//! Mixed precision: autocast regions with bf16 (or fp16) compute and fp32 master weights, and the
//! TF32 switch. The loss is computed under autocast; backward and the optimiser run outside it.

use serde::{Deserialize, Serialize};
use tch::Device;

extern "C" {
    fn unclip_autocast_enter(device: i32, dtype: i32) -> i32;
    fn unclip_autocast_exit(device: i32, prev: i32);
    fn unclip_set_tf32(enabled: bool);
    fn unclip_tf32_enabled() -> bool;
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
    // SAFETY: plain integers; the guard restores the state.
    let prev = unsafe { unclip_autocast_enter(device, 0) };
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
