//! Activation checkpointing (`torch.utils.checkpoint`, diffusers' `enable_gradient_checkpointing`):
//! [`checkpoint`] runs a block without keeping its activations for backward and recomputes them
//! there, trading one more forward of the block for the memory its activations would hold.
//!
//! A C++ autograd Function (`csrc/checkpoint.cpp`) holds the closure: its forward runs the closure
//! with autograd off and saves only the inputs; its backward runs the closure again with autograd
//! on — from the forward's RNG state (dropout draws the same masks) and autocast state — and
//! backpropagates through it. Gradients equal the plain block's (tested).
//!
//! libtorch's CPU generator is process-wide: the recomputation sets it to the forward's state and
//! back, so another thread drawing from it during a backward draws from a moved stream (the
//! trainers draw from one thread; the data loaders use their own generators).

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{DiffusionError, Result};

type Block = Box<dyn Fn(&[Tensor]) -> std::result::Result<Vec<Tensor>, String> + Send>;

type RunFn = extern "C" fn(
    *mut c_void,
    *mut *mut C_tensor,
    i64,
    *mut *mut C_tensor,
    i64,
    *mut i64,
    *mut c_char,
    i64,
) -> i32;
type DropFn = extern "C" fn(*mut c_void);

extern "C" {
    fn unclip_checkpoint(
        closure: *mut c_void,
        run: RunFn,
        drop: DropFn,
        inputs: *const *const C_tensor,
        n_inputs: i64,
        outputs: *mut *mut C_tensor,
        max_outputs: i64,
        n_outputs: *mut i64,
    ) -> i32;
    fn unclip_checkpoint_last_error() -> *const c_char;
}

/// A module shared between its owner and the checkpointed closures that recompute it in backward,
/// which keep it alive as long as the graph needs it.
#[derive(Debug)]
pub struct Shared<T>(Arc<T>);

// SAFETY: tch marks tensors Send but not Sync; a Shared module is only read — by its owner's
// forward and by the recomputation in backward, which autograd may run on another thread — and
// concurrent reads of a libtorch tensor (atomic reference counts, ops that do not write their
// inputs) are safe.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub fn new(module: T) -> Self {
        Self(Arc::new(module))
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

static BLOCK_RUNS: AtomicU64 = AtomicU64::new(0);

/// How many times checkpointed blocks have run in this process, forwards and recomputations
/// together (each block twice per training step): what shows that checkpointing is on.
pub fn block_runs() -> u64 {
    BLOCK_RUNS.load(Ordering::Relaxed)
}

/// Outputs a block may return.
const MAX_OUTPUTS: usize = 16;

/// `f(inputs)`, its activations recomputed in backward instead of kept. Every tensor the block
/// differentiates must be among `inputs` (what it captures is used as is, and gradients do not
/// flow into captured tensors — capture parameters, which receive theirs, and constants), and `f`
/// must compute the same thing when called again. With no input requiring a gradient (or autograd
/// off) there is nothing to recompute for, and `f` simply runs.
pub fn checkpoint<F, E>(inputs: &[&Tensor], f: F) -> Result<Vec<Tensor>>
where
    F: Fn(&[Tensor]) -> std::result::Result<Vec<Tensor>, E> + Send + 'static,
    E: std::fmt::Display,
{
    if !inputs.iter().any(|t| t.requires_grad()) {
        let owned: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        return f(&owned).map_err(|e| DiffusionError::Checkpoint(format!("{e:#}")));
    }
    // `{:#}`: an anyhow error's whole chain of context.
    let block: Block = Box::new(move |xs: &[Tensor]| f(xs).map_err(|e| format!("{e:#}")));
    let closure = Box::into_raw(Box::new(block)) as *mut c_void;
    let ptrs: Vec<*const C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let mut outputs = [std::ptr::null_mut::<C_tensor>(); MAX_OUTPUTS];
    let mut n = 0i64;
    // SAFETY: the C++ side takes ownership of `closure` (freeing it through `drop_block`, once),
    // borrows the input tensors for the call and hands back `n` new at::Tensor*, which
    // Tensor::from_ptr owns.
    unsafe {
        let rc = unclip_checkpoint(
            closure,
            run_block,
            drop_block,
            ptrs.as_ptr(),
            ptrs.len() as i64,
            outputs.as_mut_ptr(),
            MAX_OUTPUTS as i64,
            &mut n,
        );
        if rc != 0 {
            let message = CStr::from_ptr(unclip_checkpoint_last_error()).to_string_lossy();
            return Err(DiffusionError::Checkpoint(message.into_owned()));
        }
        Ok(outputs[..n as usize]
            .iter()
            .map(|&p| Tensor::from_ptr(p))
            .collect())
    }
}

/// [`checkpoint`] of a block with one output, as the layers of every network here are.
pub fn checkpoint_one<F, E>(inputs: &[&Tensor], f: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> std::result::Result<Tensor, E> + Send + 'static,
    E: std::fmt::Display,
{
    let outputs = checkpoint(inputs, move |xs: &[Tensor]| f(xs).map(|y| vec![y]))?;
    let n = outputs.len();
    <[Tensor; 1]>::try_from(outputs)
        .map(|[y]| y)
        .map_err(|_| DiffusionError::Checkpoint(format!("{n} outputs, expected one")))
}

/// Called by the C++ Function, in forward and again in backward.
extern "C" fn run_block(
    closure: *mut c_void,
    inputs: *mut *mut C_tensor,
    n_inputs: i64,
    outputs: *mut *mut C_tensor,
    max_outputs: i64,
    n_outputs: *mut i64,
    error: *mut c_char,
    error_len: i64,
) -> i32 {
    // SAFETY: `closure` is the Block `checkpoint` boxed, alive until `drop_block`; each input is a
    // new at::Tensor* whose ownership passes here; `outputs` has room for `max_outputs`.
    BLOCK_RUNS.fetch_add(1, Ordering::Relaxed);
    unsafe {
        let block = &*(closure as *const Block);
        let xs: Vec<Tensor> = (0..n_inputs as usize)
            .map(|i| Tensor::from_ptr(*inputs.add(i)))
            .collect();
        let message = match catch_unwind(AssertUnwindSafe(|| block(&xs))) {
            Ok(Ok(ys)) if ys.len() <= max_outputs as usize => {
                *n_outputs = ys.len() as i64;
                for (i, mut y) in ys.into_iter().enumerate() {
                    *outputs.add(i) = y.as_mut_ptr();
                    std::mem::forget(y); // the C++ side deletes it
                }
                return 0;
            }
            Ok(Ok(ys)) => format!("{} outputs, at most {max_outputs}", ys.len()),
            Ok(Err(e)) => e,
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the block panicked".into()),
        };
        *n_outputs = 0;
        let bytes = message.as_bytes();
        let len = bytes.len().min(error_len.max(1) as usize - 1);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), error as *mut u8, len);
        *error.add(len) = 0;
        -1
    }
}

extern "C" fn drop_block(closure: *mut c_void) {
    // SAFETY: called once, by the holder that owns the Block `checkpoint` boxed.
    unsafe { drop(Box::from_raw(closure as *mut Block)) }
}
