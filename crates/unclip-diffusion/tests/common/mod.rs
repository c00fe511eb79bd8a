//! Fixture loading and tensor comparison for the parity tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

pub fn fixtures(name: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!(
                "reading {}: {e} (regenerate with scripts/fixtures/diffusion.py)",
                path.display()
            )
        })
        .into_iter()
        .collect()
}

pub fn get<'a>(f: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    f.get(key)
        .unwrap_or_else(|| panic!("fixture has no `{key}`"))
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("f64 vec")
}

/// Asserts |a − b| <= atol + rtol·|b| elementwise, naming the worst element.
pub fn assert_close(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64, what: &str) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let a = to_vec(actual);
    let b = to_vec(expected);
    let mut worst = (0usize, 0.0f64);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.1 || x.is_nan() != y.is_nan() {
            worst = (i, excess.max(f64::MIN_POSITIVE));
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} is {} but expected {} (atol {atol}, rtol {rtol})",
        worst.0,
        a[worst.0],
        b[worst.0]
    );
}

pub fn assert_slice_close(actual: &[f64], expected: &Tensor, atol: f64, rtol: f64, what: &str) {
    assert_close(
        &Tensor::from_slice(actual),
        &expected.to_kind(Kind::Double).flatten(0, -1),
        atol,
        rtol,
        what,
    );
}

pub fn full_t(b: i64, t: i64) -> Tensor {
    Tensor::full([b], t, (Kind::Int64, tch::Device::Cpu))
}
