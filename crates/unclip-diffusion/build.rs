// The fused GroupNorm → affine → SiLU CPU kernel (src/nn/norm_act.rs).
fn main() {
    unclip_build::compile_libtorch_kernels("unclip_norm_act", &["csrc/norm_act.cpp"]);
}
