//! Device parsing and the CUDA backend that `--as-needed` would otherwise drop.
use unclip_diffusion::device::{cuda_backend_loaded, load_cuda_backend, parse_device};

#[test]
fn device_specs_parse_or_fail_clearly() {
    assert_eq!(parse_device("cpu").unwrap(), tch::Device::Cpu);
    let auto = parse_device("auto").unwrap();
    assert_eq!(auto == tch::Device::Cpu, !tch::Cuda::is_available());
    for bad in ["tpu", "cuda:x", "cuda:-1"] {
        let err = parse_device(bad).unwrap_err().to_string();
        assert!(err.contains(&format!("device `{bad}`")), "{err}");
    }
    let n = tch::Cuda::device_count();
    let err = parse_device(&format!("cuda:{n}")).unwrap_err().to_string();
    assert!(err.contains("CUDA device(s) are visible"), "{err}");
}

#[test]
fn the_cuda_backend_of_a_cuda_libtorch_is_loaded() {
    // LIBTORCH comes from the .cargo/config.toml that scripts/setup.sh writes.
    let Some(libtorch) = option_env!("LIBTORCH") else {
        assert_eq!(load_cuda_backend(), cuda_backend_loaded());
        return;
    };
    let lib_dir = std::path::PathBuf::from(libtorch).join("lib");
    let ships_cuda = lib_dir.join("libtorch_cuda.so").exists();
    assert_eq!(
        load_cuda_backend(),
        ships_cuda,
        "libtorch at {}",
        lib_dir.display()
    );
    assert_eq!(cuda_backend_loaded(), ships_cuda);
    if ships_cuda && std::path::Path::new("/dev/nvidia0").exists() {
        assert!(
            tch::Cuda::is_available(),
            "a GPU is present but libtorch does not see it"
        );
    }
}
