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
    /// bf16 on CUDA and on CPUs with AMX-BF16, fp32 on other CPUs, where bf16 can be far slower
    /// than fp32 (the README's *Mixed precision*).
    Auto,
}

impl Precision {
    /// The config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Auto => "auto",
        }
    }
}

/// What a CPU offers bf16 matrix maths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuBf16 {
    /// AMX tiles with bf16 (Sapphire Rapids and later).
    Amx,
    /// AVX512-BF16 dot products, no AMX (AMD Zen 4, or a hypervisor that hides AMX).
    Avx512,
    /// Neither: oneDNN converts bf16 to fp32 and back around fp32 kernels.
    Emulated,
}

/// The precision a run uses, and what to tell the user about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub precision: Precision,
    /// What `auto` chose and why, or a warning that an explicit choice will be slow.
    pub note: Option<String>,
}

/// Resolves `train.precision` for `device` on this machine.
pub fn resolve(requested: Precision, device: Device) -> Resolved {
    resolve_for(requested, device.is_cuda(), cpu_bf16())
}

/// The warning for an explicit bf16 where oneDNN can only emulate it.
const EMULATED_BF16: &str = "warning: train.precision bf16 on a CPU with neither AMX-BF16 nor \
    AVX512-BF16: oneDNN emulates bf16 (the shapes decoder trained at 0.07× fp32's images/s on \
    AVX2); `auto` picks fp32";

/// [`resolve`] for a CUDA device or not, on a CPU with `cpu` bf16 support.
pub fn resolve_for(requested: Precision, cuda: bool, cpu: CpuBf16) -> Resolved {
    let (precision, why) = match (requested, cpu) {
        (Precision::Auto, _) if cuda => (Precision::Bf16, "CUDA"),
        (Precision::Auto, CpuBf16::Amx) => (Precision::Bf16, "this CPU has AMX-BF16"),
        (Precision::Auto, CpuBf16::Avx512) => (
            Precision::Fp32,
            "this CPU has no AMX-BF16, only AVX512-BF16: bf16 may be slower; \
             set train.precision=bf16 to try it",
        ),
        (Precision::Auto, CpuBf16::Emulated) => (
            Precision::Fp32,
            "this CPU has no AMX-BF16 nor AVX512-BF16: oneDNN would emulate bf16",
        ),
        (Precision::Bf16, CpuBf16::Emulated) if !cuda => {
            return Resolved {
                precision: Precision::Bf16,
                note: Some(EMULATED_BF16.into()),
            }
        }
        (other, _) => {
            return Resolved {
                precision: other,
                note: None,
            }
        }
    };
    Resolved {
        precision,
        note: Some(format!(
            "train.precision auto: {} ({why})",
            precision.name()
        )),
    }
}

/// This CPU's bf16 support, from CPUID and what the OS saves (XCR0): AMX needs the tile state
/// (bits 17–18), AVX-512 the ZMM state (bits 5–7). A hypervisor that hides a feature clears its
/// CPUID bit.
pub fn cpu_bf16() -> CpuBf16 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid_count, _xgetbv};
        // `__cpuid_count` is safe from Rust 1.87 on, unsafe before.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU.
        let (max_leaf, leaf1) = unsafe { (__cpuid_count(0, 0).eax, __cpuid_count(1, 0)) };
        let osxsave = leaf1.ecx & (1 << 27) != 0;
        if max_leaf < 7 || !osxsave {
            return CpuBf16::Emulated;
        }
        #[allow(unused_unsafe)]
        // SAFETY: as above; leaf 7 exists (max_leaf ≥ 7).
        let (leaf7, leaf7_1) = unsafe { (__cpuid_count(7, 0), __cpuid_count(7, 1)) };
        // SAFETY: OSXSAVE is set, so XGETBV is available.
        let xcr0 = unsafe { _xgetbv(0) };
        let saved = |mask: u64| xcr0 & mask == mask;
        if leaf7.edx & (1 << 22) != 0 && saved(0b11 << 17) {
            CpuBf16::Amx
        } else if leaf7_1.eax & (1 << 5) != 0 && saved(0b1110_0110) {
            CpuBf16::Avx512
        } else {
            CpuBf16::Emulated
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        CpuBf16::Emulated
    }
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
/// `Auto` must be [`resolve`]d first: here it counts as fp32.
pub fn autocast(device: Device, precision: Precision) -> Option<AutocastGuard> {
    if matches!(precision, Precision::Fp32 | Precision::Auto) {
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
