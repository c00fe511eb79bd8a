//! AdamW and gradient clipping against torch.optim.AdamW and clip_grad_norm_.
mod common;

use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};
use unclip_testkit::max_abs_diff;
use unclip_train::config::TrainConfig;
use unclip_train::optim::AdamW;

#[test]
fn adamw_with_groups_and_clipping_matches_pytorch() {
    let f = common::fixture("adamw.safetensors");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let names = ["layer.weight", "layer.bias", "norm.weight"];
    let vars: Vec<Tensor> = names
        .iter()
        .map(|n| {
            let (module, leaf) = n.split_once('.').unwrap();
            (vs.root() / module).var_copy(leaf, &f[&format!("init/{n}")])
        })
        .collect();
    vs.double(); // var_copy creates f32 variables: convert, then copy the f64 values again
    tch::no_grad(|| {
        for (n, v) in names.iter().zip(&vars) {
            v.shallow_clone().copy_(&f[&format!("init/{n}")]);
        }
    });
    let cfg = TrainConfig {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt = AdamW::new(&vs, &cfg);
    let (decay, no_decay) = opt.groups();
    assert_eq!(decay, vec!["layer.weight"]);
    assert_eq!(no_decay, vec!["layer.bias", "norm.weight"]);
    for i in 0..6 {
        opt.zero_grad().unwrap();
        // d/dp Σ p·g = g
        let loss = names
            .iter()
            .zip(&vars)
            .map(|(n, v)| (v * &f[&format!("grad/{i}/{n}")]).sum(Kind::Double))
            .fold(Tensor::from(0.0f64), |a, b| a + b);
        loss.backward();
        let norm = opt.grad_norm().unwrap();
        assert!(
            (norm - f[&format!("norm/{i}")].double_value(&[0])).abs() < 1e-12,
            "norm at step {i}"
        );
        opt.clip_grad_norm(norm, 1.0).unwrap();
        opt.step(0.05).unwrap();
        for (n, v) in names.iter().zip(&vars) {
            let d = max_abs_diff(v, &f[&format!("after/{i}/{n}")]);
            assert!(d < 1e-12, "{n} after step {i}: off by {d}");
        }
    }
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    for n in names {
        assert!(max_abs_diff(&state[&format!("exp_avg.{n}")], &f[&format!("exp_avg/{n}")]) < 1e-12);
        assert!(
            max_abs_diff(
                &state[&format!("exp_avg_sq.{n}")],
                &f[&format!("exp_avg_sq/{n}")]
            ) < 1e-12
        );
    }
    assert_eq!(opt.steps_taken(), 6);
    // Missing or mis-shaped state is a named error.
    let mut partial: HashMap<String, Tensor> = state
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    partial.remove("exp_avg.layer.bias");
    assert!(opt
        .load_state(&partial, 6)
        .unwrap_err()
        .to_string()
        .contains("exp_avg.layer.bias"));
    let mut wrong = state;
    wrong.insert(
        "exp_avg_sq.norm.weight".into(),
        Tensor::zeros([2], (Kind::Double, Device::Cpu)),
    );
    assert!(opt
        .load_state(&wrong, 6)
        .unwrap_err()
        .to_string()
        .contains("exp_avg_sq.norm.weight"));
}

#[test]
fn learning_rate_warms_up_then_decays() {
    use unclip_train::config::LrSchedule;
    use unclip_train::lr::learning_rate;
    let cfg = TrainConfig {
        steps: 110,
        lr: 1.0,
        warmup_steps: 10,
        lr_schedule: LrSchedule::Cosine,
        min_lr_ratio: 0.1,
        ..Default::default()
    };
    assert!((learning_rate(&cfg, 0) - 0.1).abs() < 1e-12);
    assert!((learning_rate(&cfg, 9) - 1.0).abs() < 1e-12);
    assert!((learning_rate(&cfg, 10) - 1.0).abs() < 1e-12);
    assert!(
        (learning_rate(&cfg, 60) - 0.55).abs() < 1e-12,
        "halfway: floor + half the range"
    );
    assert!((learning_rate(&cfg, 110) - 0.1).abs() < 1e-12);
    let constant = TrainConfig {
        lr_schedule: LrSchedule::Constant,
        ..cfg
    };
    assert_eq!(learning_rate(&constant, 100), 1.0);
}

/// A few steps of AdamW with weight decay on fresh 4-D and 1-D parameters, with fixed gradients;
/// returns the parameters after them.
fn adamw_steps(channels_last: bool) -> Vec<Tensor> {
    let vs = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(3);
    let w = (vs.root() / "conv").randn("weight", &[8, 4, 3, 3], 0.0, 1.0);
    let b = (vs.root() / "conv").randn("bias", &[8], 0.0, 1.0);
    if channels_last {
        unclip_train::precision::to_channels_last(&vs);
        assert!(unclip_train::precision::is_channels_last(&w));
    }
    let cfg = TrainConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt = AdamW::new(&vs, &cfg);
    for i in 0..3 {
        opt.zero_grad().unwrap();
        tch::manual_seed(10 + i);
        let gw = Tensor::randn([8, 4, 3, 3], (Kind::Float, Device::Cpu));
        let gb = Tensor::randn([8], (Kind::Float, Device::Cpu));
        ((&w * gw).sum(Kind::Float) + (&b * gb).sum(Kind::Float)).backward();
        opt.step(0.01).unwrap();
    }
    vec![w.contiguous(), b]
}

#[test]
fn adamw_updates_channels_last_parameters_as_contiguous_ones() {
    let (plain, cl) = (adamw_steps(false), adamw_steps(true));
    for (a, b) in plain.iter().zip(&cl) {
        assert!(max_abs_diff(a, b) < 1e-6, "off by {}", max_abs_diff(a, b));
    }
    // The steps moved the weights (a no-op optimiser would pass the comparison).
    tch::manual_seed(3);
    let init = Tensor::randn([8, 4, 3, 3], (Kind::Float, Device::Cpu));
    assert!(max_abs_diff(&plain[0], &init) > 0.01);
}

#[test]
fn multi_tensor_ops_match_per_tensor_ops() {
    use unclip_train::multi_tensor;
    let opts = (Kind::Float, Device::Cpu);
    tch::manual_seed(0);
    let make = || {
        vec![
            Tensor::randn([5, 7], opts),
            Tensor::randn([3], opts),
            Tensor::randn([2, 3, 4, 4], opts),
        ]
    };
    let (a, b) = (make(), make());
    let expected = a
        .iter()
        .map(|t| t.norm().double_value(&[]).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm = multi_tensor::global_norm(&a).unwrap();
    assert!((norm - expected).abs() < 1e-5 * expected);
    let none: [Tensor; 0] = [];
    assert_eq!(multi_tensor::global_norm(&none).unwrap(), 0.0);

    let before: Vec<Tensor> = a.iter().map(Tensor::copy).collect();
    multi_tensor::lerp_(&a, &b, 0.25).unwrap();
    for ((x, x0), y) in a.iter().zip(&before).zip(&b) {
        let want = x0 * 0.75 + y * 0.25;
        assert!(max_abs_diff(x, &want) < 1e-6);
    }
    multi_tensor::mul_(&a, -2.0).unwrap();
    for ((x, x0), y) in a.iter().zip(&before).zip(&b) {
        let want = (x0 * 0.75 + y * 0.25) * -2.0;
        assert!(max_abs_diff(x, &want) < 1e-5);
    }
    multi_tensor::zero_(&a).unwrap();
    assert!(a.iter().all(|t| t.abs().max().double_value(&[]) == 0.0));
    // Empty lists are no-ops; mismatched lists are errors that say which op.
    multi_tensor::zero_(&none).unwrap();
    let err = multi_tensor::lerp_(&a, &b[..2], 0.5).unwrap_err();
    assert!(err.to_string().contains("unequal"), "{err}");
    let wrong = [Tensor::zeros([4], opts)];
    let err = multi_tensor::lerp_(&a[1..2], &wrong, 0.5).unwrap_err();
    assert!(err.to_string().starts_with("multi-tensor lerp:"), "{err}");
}
