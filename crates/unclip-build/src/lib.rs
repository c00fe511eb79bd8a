//! Build-script helper: compiles a C++ shim against the same libtorch headers tch links
//! (`LIBTORCH`, written into `.cargo/config.toml` by scripts/setup.sh).

use std::path::PathBuf;

/// Compiles `files` into the static library `lib` with the given preprocessor `defines`.
/// Panics (the build-script way of failing) with a hint when LIBTORCH is unset.
pub fn compile_libtorch_shim(lib: &str, files: &[&str], defines: &[&str]) {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let libtorch = PathBuf::from(std::env::var("LIBTORCH").unwrap_or_else(|_| {
        panic!("LIBTORCH is not set: run scripts/setup.sh, which writes it into .cargo/config.toml")
    }));
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
    for d in defines {
        build.define(d, None);
    }
    build.files(files).compile(lib);
}
