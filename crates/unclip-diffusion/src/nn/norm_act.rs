//! GroupNorm → affine per sample and channel → optional SiLU, the chain every ADM ResBlock runs
//! twice (norm1 → SiLU; norm2 → scale-shift from the embedding → SiLU). On the CPU it is one fused
//! kernel (csrc/norm_act.cpp, forward and backward) in float32, bfloat16 and float64: as separate
//! ATen ops the chain's forward and backward take 2.7–4× the GroupNorm's own time there, fused
//! 1.1–1.8× (AVX-512 build; `cargo run --release -p unclip-diffusion --example bench_norm_act`).
//! Elsewhere (CUDA) it runs as those ops.

use std::ffi::{c_void, CStr};
use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{nn, Device, Kind, Tensor};

extern "C" {
    fn unclip_group_norm_act(
        x: *const c_void,
        a: *const c_void,
        b: *const c_void,
        groups: i64,
        eps: f64,
        silu: bool,
    ) -> *mut c_void;
    fn unclip_norm_act_last_error() -> *const c_char;
    fn unclip_norm_act_isa() -> *const c_char;
}

static FUSED_CPU: AtomicBool = AtomicBool::new(true);

/// Whether `group_norm_act` runs its fused kernel on CPU tensors (the default) or the ATen ops,
/// process-wide, like PyTorch's backend switches: for A/B measurements and numerics checks.
pub fn set_fused_cpu(enabled: bool) {
    FUSED_CPU.store(enabled, Ordering::Relaxed);
}

pub fn fused_cpu_enabled() -> bool {
    FUSED_CPU.load(Ordering::Relaxed)
}

/// The instruction set the CPU kernel runs with — `avx512`, `avx2` or `default` — chosen as ATen
/// chooses its own kernels (so `ATEN_CPU_CAPABILITY` overrides it).
pub fn cpu_kernel_isa() -> &'static str {
    // SAFETY: a static C string.
    unsafe { CStr::from_ptr(unclip_norm_act_isa()) }
        .to_str()
        .unwrap_or("unknown")
}

/// act(GroupNorm(x) · gain + bias) for x [N, C, …]; `gain` and `bias` are [C] (GroupNorm's own
/// affine) or [N, C] (folded with a per-sample scale-shift), None for 1 and 0; act is SiLU when
/// `silu`, else the identity. Panics on inconsistent shapes, as tch's modules do.
pub fn group_norm_act(
    x: &Tensor,
    groups: i64,
    eps: f64,
    gain: Option<&Tensor>,
    bias: Option<&Tensor>,
    silu: bool,
) -> Tensor {
    let size = x.size();
    assert!(
        size.len() >= 2 && groups > 0 && size[1] % groups == 0,
        "group_norm_act: input of shape {size:?} cannot be split into {groups} groups of channels"
    );
    let fused = fused_cpu_enabled()
        && x.device() == Device::Cpu
        && matches!(x.kind(), Kind::Float | Kind::BFloat16 | Kind::Double)
        && x.numel() > 0;
    if fused {
        fused_cpu(x, groups, eps, gain, bias, silu)
    } else {
        group_norm_act_composite(x, groups, eps, gain, bias, silu)
    }
}

/// SiLU(norm(x)) for a GroupNorm module with its own affine (tch keeps its eps private).
pub fn group_norm_silu(norm: &nn::GroupNorm, eps: f64, x: &Tensor) -> Tensor {
    group_norm_act(
        x,
        norm.num_groups,
        eps,
        norm.ws.as_ref(),
        norm.bs.as_ref(),
        true,
    )
}

/// gain or bias as [N or 1, C, 1, …] to broadcast over x.
fn broadcastable(t: &Tensor, x_dims: usize) -> Tensor {
    let mut shape = match t.dim() {
        1 => vec![1, t.size()[0]],
        _ => t.size(),
    };
    shape.resize(x_dims, 1);
    t.view(shape.as_slice())
}

/// The same chain as separate ATen ops: the reference the fused kernel is tested against, and
/// the path off the CPU.
pub fn group_norm_act_composite(
    x: &Tensor,
    groups: i64,
    eps: f64,
    gain: Option<&Tensor>,
    bias: Option<&Tensor>,
    silu: bool,
) -> Tensor {
    let dims = x.dim();
    let normalised = x.group_norm(groups, None::<Tensor>, None::<Tensor>, eps, true);
    let y = match (gain, bias) {
        (Some(g), Some(b)) => broadcastable(b, dims).addcmul(&normalised, &broadcastable(g, dims)),
        (Some(g), None) => normalised * broadcastable(g, dims),
        (None, Some(b)) => normalised + broadcastable(b, dims),
        (None, None) => normalised,
    };
    if silu {
        y.silu()
    } else {
        y
    }
}

/// gain or bias as the kernel's [N, C] in its affine dtype.
fn per_sample(t: Option<&Tensor>, fill: f64, n: i64, c: i64, kind: Kind) -> Tensor {
    match t {
        Some(t) if t.dim() == 1 => t.view([1, c]).expand([n, c], false).to_kind(kind),
        Some(t) => t.view([n, c]).to_kind(kind),
        None => Tensor::full([n, c], fill, (kind, Device::Cpu)),
    }
}

fn fused_cpu(
    x: &Tensor,
    groups: i64,
    eps: f64,
    gain: Option<&Tensor>,
    bias: Option<&Tensor>,
    silu: bool,
) -> Tensor {
    let size = x.size();
    let (n, c) = (size[0], size[1]);
    let kind = if x.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let a = per_sample(gain, 1.0, n, c, kind);
    let b = per_sample(bias, 0.0, n, c, kind);
    // SAFETY: the pointers are live tch tensors for the call; the result is a fresh at::Tensor*
    // that Tensor::from_ptr takes ownership of.
    unsafe {
        let out = unclip_group_norm_act(
            x.as_ptr() as *const c_void,
            a.as_ptr() as *const c_void,
            b.as_ptr() as *const c_void,
            groups,
            eps,
            silu,
        );
        if out.is_null() {
            let message = CStr::from_ptr(unclip_norm_act_last_error()).to_string_lossy();
            panic!("group_norm_act on {size:?}: {message}");
        }
        Tensor::from_ptr(out as *mut torch_sys::C_tensor)
    }
}
