// The mixed-precision shim (autocast dtype, TF32).
fn main() {
    unclip_build::compile_libtorch_shim("unclip_precision", &["csrc/precision.cpp"], &[]);
}
