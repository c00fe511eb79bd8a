// The fused GroupNorm → affine → SiLU CPU kernel (src/nn/norm_act.rs) and the activation
// checkpointing Function (src/nn/checkpoint.rs).
fn main() {
    unclip_build::compile_libtorch_kernels("unclip_norm_act", &["csrc/norm_act.cpp"]);
    unclip_build::compile_libtorch_shim("unclip_checkpoint", &["csrc/checkpoint.cpp"], &[]);
}
