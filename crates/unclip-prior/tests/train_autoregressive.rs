//! The autoregressive prior trained through the runtime on the synthetic caption-dependent
//! embeddings: the loss falls, its samples land near the true embeddings (far above the z_t
//! baseline, close to the codec's ceiling), conditioning on a high z_i · z_t band gives samples
//! closer to the caption than a low one, and resume is exact.
mod common;

use common::*;
use unclip_prior::Prior;

/// 16 of 32 components (the concept directions and the z_t they may lean to span 16), 64 buckets.
fn section(dot_quantile: &str) -> String {
    format!(
        "
  kind: autoregressive
  autoregressive: {{num_attention_heads: 2, attention_head_dim: 16, num_layers: 2, text_layers: 0,
    embedding_dim: 32, num_embeddings: 16, components: 16, buckets: 64, range: 4.0,
    dot_buckets: 8, dot_quantile: {dot_quantile}}}"
    )
}

#[test]
fn autoregressive_prior_learns_caption_dependent_embeddings() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), true);
    let cfg = config_with(&dir, 300, "stored", &section("null"));
    let (_vs, task, summary) = train(&cfg, &tmp.path().join("run"), false);
    let mean = |v: &[(u64, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&summary.losses[..10]), mean(&summary.losses[280..]));
    // Starts at ln 64 ≈ 4.16 nats per code.
    assert!(first > 3.5 && last < 2.5, "loss {first:.4} -> {last:.4}");
    let report = task.evaluate(&[1.0, 3.0]).unwrap().unwrap();
    let ceiling = report.codec_round_trip.unwrap();
    assert!(ceiling > 0.99, "codec round trip {ceiling}");
    // Two noisy draws of one concept have cosine ≈ 0.97; z_t alone scores ≈ 0.
    for r in &report.rows {
        assert!(
            r.cos_true > 0.85 && r.cos_true > report.baseline + 0.5,
            "guidance {}: {}",
            r.guidance_scale,
            report.summary()
        );
    }
}

#[test]
fn a_high_dot_product_band_gives_samples_closer_to_the_caption() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset_with(tmp.path(), true, true);
    let cfg = config_with(&dir, 300, "stored", &section("0.95"));
    let (_vs, mut task, _) = train(&cfg, &tmp.path().join("run"), false);
    let cos_text = |q: f64, task: &mut unclip_prior::task::PriorTask| {
        let Prior::Autoregressive(m) = &mut task.model else {
            panic!("not the autoregressive prior")
        };
        m.cfg.dot_quantile = Some(q);
        task.evaluate(&[1.0]).unwrap().unwrap().rows[0].cos_text
    };
    let (high, low) = (cos_text(0.95, &mut task), cos_text(0.05, &mut task));
    assert!(
        high > low + 0.1,
        "cos(sample, z_t): top band {high:.3}, bottom band {low:.3}"
    );
}

#[test]
fn resumed_autoregressive_training_ends_with_identical_weights() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), true);
    let full = config_with(&dir, 20, "stored", &section("null"));
    let (vs_full, _, _) = train(&full, &tmp.path().join("full"), false);
    let run = tmp.path().join("split");
    train(
        &config_with(&dir, 10, "stored", &section("null")),
        &run,
        false,
    );
    let (vs_split, _, summary) = train(&full, &run, true);
    assert!(summary.resumed_from.is_some());
    for (name, a) in unclip_train::named_variables(&vs_full) {
        let b = &vs_split.variables()[&name];
        assert!(a.equal(b), "{name} differs after resume");
    }
    // The codec is part of the weights: fitted, saved and restored with them.
    let explained = vs_split.variables()["codec.explained"].double_value(&[]);
    assert!(explained > 0.9, "{explained}");
}
