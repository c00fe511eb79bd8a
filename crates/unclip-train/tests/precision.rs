//! bf16 autocast against torch.autocast("cpu", bfloat16), and a bf16 training run.
mod common;

use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};
use unclip_train::precision::{autocast, set_tf32, tf32_enabled, Precision};
use unclip_train::toy::{ToyConfig, ToyTask};
use unclip_train::{config::parse_config, train};

#[test]
fn autocast_matches_pytorch_and_restores_fp32() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/autocast.safetensors");
    let f: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect();
    let (x, w, b) = (&f["x"], &f["w"], &f["bias"]);
    {
        let _guard = autocast(Device::Cpu, Precision::Bf16);
        let lin = x.linear(w, Some(b));
        assert_eq!(lin.kind(), Kind::BFloat16);
        assert!(
            lin.to_kind(Kind::Float).equal(&f["linear"]),
            "linear differs from torch.autocast"
        );
        let mm = x.matmul(&w.tr());
        assert!(
            mm.to_kind(Kind::Float).equal(&f["matmul"]),
            "matmul differs from torch.autocast"
        );
        let sm = x.softmax(-1, None::<Kind>);
        assert_eq!(sm.kind(), Kind::Float, "softmax stays fp32 under autocast");
        assert!(sm.allclose(&f["softmax"], 1e-6, 1e-7, false));
        // Nested fp32 region: nothing changes, and leaving it keeps bf16 on.
        assert!(autocast(Device::Cpu, Precision::Fp32).is_none());
        assert_eq!(x.linear(w, Some(b)).kind(), Kind::BFloat16);
    }
    assert_eq!(
        x.linear(w, Some(b)).kind(),
        Kind::Float,
        "autocast is off after the guard"
    );

    set_tf32(false);
    assert!(!tf32_enabled());
    set_tf32(true);
    assert!(tf32_enabled());
}

#[test]
fn bf16_training_keeps_fp32_master_weights_and_learns() {
    let cfg = parse_config::<ToyConfig>(
        common::CONFIG,
        &["train.precision=bf16".into(), "train.steps=60".into()],
    )
    .unwrap();
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut task = ToyTask::new(&vs, &cfg.task, 64).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let summary = train(
        &mut task,
        &vs,
        &cfg.runtime,
        &cfg.resolved,
        tmp.path(),
        None,
    )
    .unwrap();
    let mean = |s: &[(u64, f64)]| s.iter().map(|l| l.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&summary.losses[..10]), mean(&summary.losses[50..]));
    assert!(last < 0.8 * first, "bf16 loss {first:.3} -> {last:.3}");
    assert!(
        vs.variables().values().all(|v| v.kind() == Kind::Float),
        "master weights stay fp32"
    );
    let ck = unclip_train::checkpoint::load(summary.last_checkpoint.as_ref().unwrap()).unwrap();
    assert!(ck
        .model
        .values()
        .chain(ck.optimizer.values())
        .all(|t| t.kind() == Kind::Float));
    let err =
        parse_config::<ToyConfig>(common::CONFIG, &["train.precision=fp8".into()]).unwrap_err();
    assert!(
        format!("{err:#}").contains("train.precision: unknown variant `fp8`"),
        "{err:#}"
    );
}
