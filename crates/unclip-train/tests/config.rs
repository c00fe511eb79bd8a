//! Config loading: every error names the key (and the file), before any work.
mod common;

use unclip_train::config::{load_config, parse_config, GradReduce, LrSchedule};
use unclip_train::toy::ToyConfig;

fn err(text: &str, overrides: &[&str]) -> String {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    format!("{:#}", parse_config::<ToyConfig>(text, &o).unwrap_err())
}

#[test]
fn good_configs_load_with_defaults_and_overrides() {
    let cfg = parse_config::<ToyConfig>(
        common::CONFIG,
        &[
            "train.lr=5e-4".into(),
            "train.lr_schedule=constant".into(),
            "model.depth=3".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.runtime.train.lr, 5e-4);
    assert_eq!(cfg.runtime.train.lr_schedule, LrSchedule::Constant);
    assert_eq!(cfg.task.model.depth, 3);
    assert_eq!(cfg.runtime.train.beta1, 0.9, "default");
    assert_eq!(cfg.resolved["train"]["lr"].as_f64(), Some(5e-4));
    // A new section can be created from the command line.
    let cfg = parse_config::<ToyConfig>(
        "model: {hidden: 8, depth: 1}\n",
        &["checkpoint.every=7".into()],
    )
    .unwrap();
    assert_eq!(cfg.runtime.checkpoint.every, 7);
}

#[test]
fn gradient_buckets_are_sent_during_backward_unless_set() {
    let cfg = parse_config::<ToyConfig>(common::CONFIG, &[]).unwrap();
    assert_eq!(
        cfg.runtime.distributed.grad_reduce,
        GradReduce::DuringBackward
    );
    let cfg = parse_config::<ToyConfig>(
        common::CONFIG,
        &["distributed.grad_reduce=after_backward".into()],
    )
    .unwrap();
    assert_eq!(
        cfg.runtime.distributed.grad_reduce,
        GradReduce::AfterBackward
    );
}

#[test]
fn bad_configs_name_the_key() {
    let base = "model: {hidden: 8, depth: 1}\n";
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "model: {hidden: 8, depth: 1}\ntrain: {lr_rate: 1}\n",
            &[],
            "train.lr_rate: unknown field `lr_rate`",
        ),
        (
            "model: {hidden: 8, depth: 1}\ntrain: {lr: fast}\n",
            &[],
            "train.lr: invalid type: string \"fast\"",
        ),
        (
            "model: {hidden: 8, depth: 1}\nmodle: {}\n",
            &[],
            "unknown field `modle`",
        ),
        (
            "model: {hidden: 0, depth: 1}\n",
            &[],
            "model.hidden must be > 0",
        ),
        (base, &["train.lr=-1"], "train.lr must be > 0"),
        (base, &["train.beta2=1.5"], "train.beta2 must be in [0, 1)"),
        (
            base,
            &["train.lr_schedule=linear"],
            "train.lr_schedule: unknown variant `linear`",
        ),
        (base, &["device=tpu"], "device `tpu`"),
        (
            base,
            &["diffusion.schedule=sigmoid"],
            "unknown noise schedule `sigmoid`",
        ),
        (
            base,
            &["distributed.grad_reduce=sideways"],
            "distributed.grad_reduce: unknown variant `sideways`",
        ),
        (
            base,
            &["distributed.shard_gradients=true"],
            "distributed.shard_gradients: true needs distributed.shard_optimizer: true",
        ),
        (base, &["train.lr"], "expected KEY=VALUE"),
        (
            base,
            &["model.hidden.x=1"],
            "`model.hidden` is not a section",
        ),
        ("model: [1, 2\n", &[], "did not find expected"),
        ("- a list\n", &[], "top level must be a mapping"),
    ];
    for (text, overrides, want) in cases {
        let e = err(text, overrides);
        assert!(
            e.contains(want),
            "{text:?} {overrides:?}: `{e}` lacks `{want}`"
        );
    }
}

#[test]
fn errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.yaml");
    std::fs::write(&path, "model: {hidden: 8, depth: 1}\ntrain: {stepz: 3}\n").unwrap();
    let e = format!("{:#}", load_config::<ToyConfig>(&path, &[]).unwrap_err());
    assert!(e.contains("bad.yaml") && e.contains("stepz"), "{e}");
    let e = format!(
        "{:#}",
        load_config::<ToyConfig>(&tmp.path().join("missing.yaml"), &[]).unwrap_err()
    );
    assert!(e.contains("missing.yaml"), "{e}");
}
