//! Device selection. Also loads libtorch's CUDA backend: the linker's `--as-needed` drops
//! `libtorch_cuda.so` because nothing references its symbols directly, and without it libtorch
//! reports no GPU.

use crate::error::{DiffusionError, Result};
use std::sync::Once;
use tch::Device;

static CUDA_BACKEND: Once = Once::new();

/// dlopens `libtorch_cuda.so` once, if libtorch ships it (searched via rpath / LD_LIBRARY_PATH).
/// Returns whether it is loaded.
pub fn load_cuda_backend() -> bool {
    CUDA_BACKEND.call_once(|| {
        for name in [c"libtorch_cuda.so", c"libtorch_hip.so"] {
            // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally leaked
            // so the library stays loaded for the life of the process.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                break;
            }
        }
    });
    cuda_backend_loaded()
}

/// Whether a libtorch GPU backend library is mapped into this process.
pub fn cuda_backend_loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.contains("libtorch_cuda.so") || m.contains("libtorch_hip.so"))
        .unwrap_or(false)
}

/// Parses `auto | cpu | cuda | cuda:N`; `auto` picks the first GPU when there is one.
pub fn parse_device(spec: &str) -> Result<Device> {
    load_cuda_backend();
    let bad = |why: &str| DiffusionError::InvalidConfig(format!("device `{spec}`: {why}"));
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !tch::Cuda::is_available() {
                return Err(bad("no CUDA device is visible"));
            }
            Ok(Device::Cuda(0))
        }
        other => {
            let idx = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| bad("expected auto, cpu, cuda or cuda:N"))?;
            let count = tch::Cuda::device_count() as usize;
            if idx >= count {
                return Err(bad(&format!("only {count} CUDA device(s) are visible")));
            }
            Ok(Device::Cuda(idx))
        }
    }
}
