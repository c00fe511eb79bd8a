//! The fused CPU GroupNorm → affine → SiLU kernel against the same chain as ATen ops: values and
//! the gradients of the input, gain and bias, in float64 (the algebra, to rounding), float32 and
//! bfloat16 (the kernel's own arithmetic: its exp, its moments, its rounding).
mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use unclip_diffusion::nn::norm_act::cpu_kernel_isa;
use unclip_diffusion::nn::{group_norm_act, group_norm_act_composite};

struct Case {
    shape: Vec<i64>,
    groups: i64,
    per_sample: bool,
    silu: bool,
    offset: f64,
}

fn cases() -> Vec<Case> {
    let case = |shape: &[i64], groups, per_sample, silu, offset| Case {
        shape: shape.to_vec(),
        groups,
        per_sample,
        silu,
        offset,
    };
    vec![
        // Several channels per group, odd non-square maps, both affine kinds, with and without SiLU.
        case(&[3, 12, 5, 7], 4, true, true, 0.0),
        case(&[2, 12, 5, 7], 4, false, true, 0.0),
        case(&[2, 6, 3, 9], 6, true, false, 0.0),
        // A map longer than the kernel's 1024-element partial sums, a mean far from 0 (the variance
        // must not cancel), a 1-D map.
        case(&[2, 4, 40, 33], 2, true, true, 50.0),
        case(&[3, 8, 17], 2, false, true, -3.0),
    ]
}

/// Values and gradients of (x, gain, bias) for the fused kernel and the composite, the composite
/// run in float64 on the same (rounded) inputs.
fn compare(c: &Case, kind: Kind, atol: f64, rtol: f64) {
    let (n, ch) = (c.shape[0], c.shape[1]);
    let x64 = Tensor::randn(c.shape.as_slice(), (Kind::Double, Device::Cpu)) * 2.0 + c.offset;
    // Round once to the kernel's dtype so both sides see the same numbers.
    let x64 = x64.to_kind(kind).to_kind(Kind::Double);
    let affine_shape: &[i64] = if c.per_sample { &[n, ch] } else { &[ch] };
    let gain = Tensor::randn(affine_shape, (Kind::Double, Device::Cpu)) + 1.0;
    let bias = Tensor::randn(affine_shape, (Kind::Double, Device::Cpu));
    let g_out = Tensor::randn(c.shape.as_slice(), (Kind::Double, Device::Cpu))
        .to_kind(kind)
        .to_kind(Kind::Double);
    let affine_kind = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let run = |fused: bool| {
        let (k, ak) = if fused {
            (kind, affine_kind)
        } else {
            (Kind::Double, Kind::Double)
        };
        let x = x64.to_kind(k).set_requires_grad(true);
        let g = gain.to_kind(ak).set_requires_grad(true);
        let b = bias.to_kind(ak).set_requires_grad(true);
        let f = if fused {
            group_norm_act
        } else {
            group_norm_act_composite
        };
        let y = f(&x, c.groups, 1e-5, Some(&g), Some(&b), c.silu);
        assert_eq!(y.kind(), k, "output dtype");
        assert_eq!(y.size(), c.shape, "output shape");
        let loss = (y.to_kind(Kind::Double) * &g_out).sum(Kind::Double);
        let grads = Tensor::run_backward(&[loss], &[&x, &g, &b], false, false);
        let mut out = vec![y.to_kind(Kind::Double)];
        out.extend(grads.iter().map(|t| t.to_kind(Kind::Double)));
        out
    };
    let (got, want) = (run(true), run(false));
    for (i, name) in ["output", "d input", "d gain", "d bias"].iter().enumerate() {
        // Gain and bias gradients sum over a whole map: scale their tolerance by its size.
        let scale = if i >= 2 {
            (c.shape[2..].iter().product::<i64>() as f64).sqrt()
                * if c.per_sample { 1.0 } else { (n as f64).sqrt() }
        } else {
            1.0
        };
        assert_close(
            &got[i],
            &want[i],
            atol * scale,
            rtol,
            &format!(
                "{kind:?} {:?} groups {} silu {} per-sample {}: {name}",
                c.shape, c.groups, c.silu, c.per_sample
            ),
        );
    }
}

#[test]
fn the_fused_norm_act_kernel_matches_the_aten_chain_in_float64() {
    tch::manual_seed(0);
    for c in cases() {
        compare(&c, Kind::Double, 1e-10, 1e-10);
    }
}

#[test]
fn the_fused_norm_act_kernel_matches_the_aten_chain_in_float32_and_bfloat16() {
    println!("norm_act kernel: {}", cpu_kernel_isa());
    tch::manual_seed(1);
    for c in cases() {
        compare(&c, Kind::Float, 2e-5, 1e-5);
        // bf16 output and input gradient round to 8 bits of mantissa (relative 2^-8).
        compare(&c, Kind::BFloat16, 2e-2, 1e-2);
    }
}

#[test]
fn the_fused_kernel_takes_strided_inputs_and_defaults_its_affine() {
    tch::manual_seed(2);
    // A transposed (non-contiguous) map, no gain or bias.
    let x = Tensor::randn([2, 9, 8, 6], (Kind::Float, Device::Cpu)).transpose(2, 3);
    let got = group_norm_act(&x, 3, 1e-6, None, None, true);
    let want = group_norm_act_composite(&x, 3, 1e-6, None, None, true);
    assert_close(&got, &want, 1e-5, 1e-5, "strided, no affine");
}

#[test]
#[should_panic(expected = "cannot be split into 5 groups")]
fn channels_that_do_not_split_into_groups_are_refused() {
    let x = Tensor::zeros([1, 12, 2, 2], (Kind::Float, Device::Cpu));
    let _ = group_norm_act(&x, 5, 1e-5, None, None, true);
}

#[test]
fn every_instruction_set_build_of_the_kernel_matches() {
    // The kernel is compiled for AVX-512, AVX2 and baseline x86-64 and follows ATen's choice,
    // which ATEN_CPU_CAPABILITY overrides once per process: rerun the float32 / bfloat16 test in
    // a child process per capability this CPU has.
    if std::env::var_os("ATEN_CPU_CAPABILITY").is_some() {
        return; // a child
    }
    let mut wanted = vec!["default"];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("bmi2") && has!("f16c") && has!("lzcnt") {
            wanted.push("avx2");
        }
    }
    for capability in wanted {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "the_fused_norm_act_kernel_matches_the_aten_chain_in_float32_and_bfloat16",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ATEN_CPU_CAPABILITY", capability)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{capability}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("norm_act kernel: {capability}")),
            "ATEN_CPU_CAPABILITY={capability} ran another build: {stdout}"
        );
    }
}
