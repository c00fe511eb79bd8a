//! Build-script helper: compiles a C++ shim against the same libtorch headers tch links
//! (`LIBTORCH`, written into `.cargo/config.toml` by scripts/setup.sh).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// The libtorch directory tch links. Panics (the build-script way of failing) with a hint when
/// LIBTORCH is unset.
pub fn libtorch_dir() -> PathBuf {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    PathBuf::from(std::env::var("LIBTORCH").unwrap_or_else(|_| {
        panic!("LIBTORCH is not set: run scripts/setup.sh, which writes it into .cargo/config.toml")
    }))
}

/// Compiles `files` into the static library `lib` with the given preprocessor `defines`.
pub fn compile_libtorch_shim(lib: &str, files: &[&str], defines: &[&str]) {
    compile_libtorch_shim_with(lib, files, defines, &[]);
}

/// [`compile_libtorch_shim`] with extra include directories (CUDA's and NCCL's headers).
pub fn compile_libtorch_shim_with(
    lib: &str,
    files: &[&str],
    defines: &[&str],
    includes: &[PathBuf],
) {
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let libtorch = libtorch_dir();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .includes(includes)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
    for d in defines {
        build.define(d, None);
    }
    build.files(files);
    compile_cached(&build, lib, files, &libtorch);
}

/// Compiles compute kernels (`files`) into the static library `lib`: optimised whatever the
/// cargo profile (the dev profile's -O1 does not vectorise), with OpenMP so `at::parallel_for`
/// runs on libtorch's intra-op threads. Links libgomp, whose soname libtorch's own copy shares, so
/// one OpenMP runtime is loaded.
pub fn compile_libtorch_kernels(lib: &str, files: &[&str]) {
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let libtorch = libtorch_dir();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .opt_level(3)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-fopenmp")
        // Floating-point exception flags are never read; without this GCC keeps compare-selects
        // (clamps) as branches under AVX2 and leaves those loops scalar.
        .flag("-fno-trapping-math")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .files(files);
    compile_cached(&build, lib, files, &libtorch);
    println!("cargo:rustc-link-lib=dylib=gomp");
}

/// `build.compile(lib)` through a cache in the target directory, keyed by the compiler's command
/// line, the sources and libtorch's version. `cargo clippy` builds workspace build scripts apart
/// from `cargo build` / `cargo test` (clippy-driver wraps them), so without it every shim, ~15 s of
/// libtorch headers a file, compiles again after each clippy run, in CI and at a desk.
fn compile_cached(build: &cc::Build, lib: &str, files: &[&str], libtorch: &Path) {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/<crate>-<hash>/out.
    let Some(cache_dir) = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent)
        .map(|p| p.join("unclip-shim-cache"))
    else {
        build.compile(lib);
        return;
    };
    let compiler = build.get_compiler();
    let mut key = std::collections::hash_map::DefaultHasher::new();
    (lib, compiler.path(), compiler.args()).hash(&mut key);
    let version = libtorch.join("include/torch/csrc/api/include/torch/version.h");
    for f in files.iter().map(Path::new).chain([version.as_path()]) {
        std::fs::read(f).unwrap_or_default().hash(&mut key);
    }
    let cached = cache_dir.join(format!("lib{lib}-{:016x}.a", key.finish()));
    let archive = out_dir.join(format!("lib{lib}.a"));
    if std::fs::copy(&cached, &archive).is_ok() {
        cc::emit_link_directives(build, &archive);
        return;
    }
    let objects = build.compile_intermediates();
    let archive = build.create_archive(lib, &objects);
    cc::emit_link_directives(build, &archive);
    // Best effort: a failed store only costs the next build a compile. The rename makes a
    // half-written archive impossible to read.
    let partial = cached.with_extension(format!("{}.partial", std::process::id()));
    if std::fs::create_dir_all(&cache_dir).is_ok() && std::fs::copy(&archive, &partial).is_ok() {
        let _ = std::fs::rename(&partial, &cached);
    }
}

/// The include directories for a shim that uses libtorch's CUDA and NCCL headers (c10d's
/// ProcessGroupNCCL), when this libtorch is a CUDA build whose headers can be found: the PyPI
/// wheel's `nvidia/*/include` packages beside `torch/`, or `CUDA_HOME` / `NCCL_INCLUDE_DIR`.
/// None for a CPU-only libtorch.
pub fn cuda_nccl_includes(libtorch: &Path) -> Option<Vec<PathBuf>> {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=NCCL_INCLUDE_DIR");
    if !libtorch.join("lib/libtorch_cuda.so").is_file() {
        return None;
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("NCCL_INCLUDE_DIR") {
        candidates.push(dir.into());
    }
    if let Ok(cuda) = std::env::var("CUDA_HOME") {
        candidates.push(Path::new(&cuda).join("include"));
    }
    if let Some(site) = libtorch.parent() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut dirs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path().join("include")))
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            candidates.extend(dirs);
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates.push("/usr/include".into());
    let find = |header: &str| {
        candidates
            .iter()
            .find(|d| d.join(header).is_file())
            .cloned()
    };
    let (nccl, cuda) = (find("nccl.h")?, find("cuda_runtime_api.h")?);
    // The wheels' CUDA headers (with nvidia-cuda-crt and nvidia-cuda-cccl) share one folder.
    let mut out = vec![cuda];
    if !out.contains(&nccl) {
        out.push(nccl);
    }
    Some(out)
}
