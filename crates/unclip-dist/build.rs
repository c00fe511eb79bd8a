// The c10d shim, with Debian's gloo headers (libgloo-dev) for ProcessGroupGloo and, when tch's
// libtorch is a CUDA build with CUDA and NCCL headers at hand (the PyPI wheel), ProcessGroupNCCL.
fn main() {
    let libtorch = unclip_build::libtorch_dir();
    match unclip_build::cuda_nccl_includes(&libtorch) {
        Some(includes) => {
            unclip_build::compile_libtorch_shim_with(
                "unclip_c10d",
                &["csrc/c10d_shim.cpp", "csrc/grad_reducer.cpp"],
                &["USE_C10D_GLOO", "USE_C10D_NCCL"],
                &includes,
            );
            // ProcessGroupNCCL lives in libtorch_cuda (and uses c10_cuda).
            println!("cargo:rustc-link-lib=dylib=torch_cuda");
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
        }
        None => {
            println!("cargo:warning=c10d shim built without NCCL (CPU-only libtorch or no CUDA/NCCL headers)");
            unclip_build::compile_libtorch_shim(
                "unclip_c10d",
                &["csrc/c10d_shim.cpp", "csrc/grad_reducer.cpp"],
                &["USE_C10D_GLOO"],
            );
        }
    }
}
