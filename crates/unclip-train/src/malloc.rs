//! glibc malloc tuned for training on CPU. By default glibc serves every allocation over its mmap
//! threshold with a fresh mmap and returns it on free, so each step's activations (megabytes each,
//! allocated and freed again every step) cost page faults and kernel page zeroing. Keeping freed
//! memory in the heap instead made the decoder's CPU training step 5–10 % faster (README,
//! Measured). The cost: resident memory stays at its peak — what a training process reaches
//! every step anyway.

/// Environment variable that turns the tuning off (`0`).
pub const ENV: &str = "UNCLIP_MALLOC_TUNING";

/// Serve large allocations from the heap and never trim it. Returns whether the tuning was applied
/// (glibc on Linux, not disabled by `UNCLIP_MALLOC_TUNING=0`). Idempotent.
pub fn retain_freed_memory() -> bool {
    if std::env::var(ENV).is_ok_and(|v| v == "0") {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only sets allocator parameters; glibc serialises it against allocations.
    unsafe {
        // No mmap-backed chunks: freed blocks of any size are reused from the heap.
        let no_mmap = libc::mallopt(libc::M_MMAP_MAX, 0) == 1;
        // Never give the heap's top back to the kernel (the largest threshold mallopt takes).
        let no_trim = libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1;
        no_mmap && no_trim
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}
