//! AdamW and gradient clipping against torch.optim.AdamW and clip_grad_norm_.
mod common;

use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};
use unclip_train::config::TrainConfig;
use unclip_train::optim::AdamW;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

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
        opt.zero_grad();
        // d/dp Σ p·g = g
        let loss = names
            .iter()
            .zip(&vars)
            .map(|(n, v)| (v * &f[&format!("grad/{i}/{n}")]).sum(Kind::Double))
            .fold(Tensor::from(0.0f64), |a, b| a + b);
        loss.backward();
        let norm = opt.grad_norm();
        assert!(
            (norm - f[&format!("norm/{i}")].double_value(&[0])).abs() < 1e-12,
            "norm at step {i}"
        );
        opt.clip_grad_norm(norm, 1.0);
        opt.step(0.05);
        for (n, v) in names.iter().zip(&vars) {
            let d = max_diff(v, &f[&format!("after/{i}/{n}")]);
            assert!(d < 1e-12, "{n} after step {i}: off by {d}");
        }
    }
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    for n in names {
        assert!(max_diff(&state[&format!("exp_avg.{n}")], &f[&format!("exp_avg/{n}")]) < 1e-12);
        assert!(
            max_diff(
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
