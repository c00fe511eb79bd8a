//! Test support shared by the crates' test suites and benchmarks.

pub mod bench;

use std::ffi::OsStr;

/// Runs `script` with the setup's venv Python (reference tooling only, never at run time) and
/// `args`; returns its stdout, panicking with its stderr if it fails.
pub fn python<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let python = std::env::var("UNCLIP_PYTHON").expect("UNCLIP_PYTHON unset: run scripts/setup.sh");
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The largest absolute difference between two tensors of the same shape (compared in f64, so
/// that neither's precision is lost): what parity tests bound.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "tensors of different shapes");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// `max_abs_diff(reference, other)` relative to the reference's largest magnitude (at least
/// 1e-12): how gradients of very different scales are compared.
pub fn relative_max_diff(reference: &tch::Tensor, other: &tch::Tensor) -> f64 {
    let scale = reference.abs().max().double_value(&[]).max(1e-12);
    max_abs_diff(reference, other) / scale
}

/// The gradient of every variable of `vs` that takes one, by name (undefined where the last
/// backward did not reach it).
pub fn gradients(vs: &tch::nn::VarStore) -> std::collections::BTreeMap<String, tch::Tensor> {
    vs.variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .map(|(name, v)| (name, v.grad()))
        .collect()
}

/// Every scalar in the event files under `dir`, read with TensorBoard's own EventAccumulator
/// (Python from the setup's venv): (tag, step) -> value.
pub fn read_scalars(dir: &std::path::Path) -> std::collections::HashMap<(String, u64), f64> {
    let script = r#"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1]); ea.Reload()
for tag in sorted(ea.Tags()["scalars"]):
    for e in ea.Scalars(tag):
        print(tag, e.step, repr(e.value))
"#;
    python(script, [dir])
        .lines()
        .map(|line| {
            let mut p = line.split_whitespace();
            let (tag, step, value) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
            (
                (tag.to_string(), step.parse().unwrap()),
                value.parse().unwrap(),
            )
        })
        .collect()
}

/// Asserts that every layer in `vs` starts as PyTorch initialises `nn.Linear` / `nn.Conv2d`
/// (what diffusers' modules keep): weights uniform in ±1/√fan_in (bound, and the spread of that
/// uniform where there are 1000+ weights), biases within the same bound and not zero (above half
/// of it where there are 32+); norms at weight 1, bias 0. Returns how many linear or conv layers
/// it checked.
pub fn assert_pytorch_default_init(vs: &tch::nn::VarStore) -> usize {
    let vars = vs.variables();
    let max_abs = |t: &tch::Tensor| t.abs().max().double_value(&[]);
    let mut layers = 0;
    for (name, w) in &vars {
        let Some(layer) = name.strip_suffix(".weight") else {
            continue;
        };
        let bias = &vars[&format!("{layer}.bias")];
        let dims = w.size();
        if dims.len() == 1 {
            assert_eq!(w.min().double_value(&[]), 1.0, "{name}: a norm starts at 1");
            assert_eq!(max_abs(w), 1.0, "{name}: a norm starts at 1");
            assert_eq!(
                max_abs(bias),
                0.0,
                "{layer}.bias: a norm's bias starts at 0"
            );
            continue;
        }
        layers += 1;
        let bound = 1.0 / (dims[1..].iter().product::<i64>() as f64).sqrt();
        let max = max_abs(w);
        // The weights are drawn within the bound rounded to f32, up to an ulp above it.
        assert!(
            max <= bound * (1.0 + f64::from(f32::EPSILON)),
            "{name}: max {max} above 1/sqrt(fan_in) = {bound}"
        );
        if w.numel() >= 1000 {
            let (std, want) = (w.std(true).double_value(&[]), bound / 3f64.sqrt());
            assert!(
                (std / want - 1.0).abs() < 0.1,
                "{name}: std {std}, uniform ±{bound} has {want}"
            );
        }
        let b = max_abs(bias);
        let floor = if bias.numel() >= 32 { bound / 2.0 } else { 0.0 };
        assert!(
            b <= bound && b > floor,
            "{layer}.bias: max {b}, bound {bound}"
        );
    }
    layers
}
