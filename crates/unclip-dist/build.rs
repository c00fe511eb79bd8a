// The c10d shim, with Debian's gloo headers (libgloo-dev) for ProcessGroupGloo.
fn main() {
    unclip_build::compile_libtorch_shim("unclip_c10d", &["csrc/c10d_shim.cpp"], &["USE_C10D_GLOO"]);
}
