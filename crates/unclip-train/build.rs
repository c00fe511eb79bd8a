// The mixed-precision shim (autocast dtype, TF32) and the multi-tensor optimiser ops.
fn main() {
    unclip_build::compile_libtorch_shim(
        "unclip_precision",
        &["csrc/precision.cpp", "csrc/multi_tensor.cpp"],
        &[],
    );
}
