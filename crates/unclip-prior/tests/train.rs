//! The prior trained through the runtime on embedding shards whose image embeddings depend on the
//! caption (8 concepts, each with its own random direction, unrelated to z_t): the loss falls, the
//! sampled embeddings land near the true ones (far above the z_t baseline), candidates are
//! reranked by z_i · z_t, resume is exact, and the text features can come from either source.
mod common;

use common::*;
use tch::{nn, Device, Kind, Tensor};
use unclip_clip::caption::{stored_condition, CaptionEncoder};
use unclip_data::embeddings::EmbeddingSample;
use unclip_prior::task::PriorTask;

#[test]
fn prior_learns_caption_dependent_embeddings_and_beats_the_zt_baseline() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), true);
    let cfg = config(&dir, 300, "stored");
    let (_vs, task, summary) = train(&cfg, &tmp.path().join("run"), false);
    let mean = |v: &[(u64, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&summary.losses[..20]), mean(&summary.losses[280..]));
    assert!(last < first * 0.3, "loss {first:.4} -> {last:.4}");
    let report = task.evaluate(&[1.0, 3.0]).unwrap().unwrap();
    assert!(report.baseline.abs() < 0.5, "baseline {}", report.baseline);
    for r in &report.rows {
        assert!(
            r.cos_true > 0.9 && r.cos_true > report.baseline + 0.5,
            "guidance {}: cos(sample, true) {:.3}, baseline {:.3}",
            r.guidance_scale,
            r.cos_true,
            report.baseline
        );
    }
    // Reranking keeps, per caption, the candidate with the highest z_i · z_t.
    let h = task.held_out().unwrap();
    let p = &cfg.task.prior;
    let s = task
        .model
        .sample(
            p,
            &task.model.sampling(p),
            &h.text,
            task.null_condition(),
            2.0,
            3,
        )
        .unwrap();
    assert_eq!(s.candidates.size(), [64, 3, 32]);
    let best = s.scores.argmax(1, false);
    for i in 0..64 {
        let b = best.int64_value(&[i]);
        let d = (s.image_embeds.get(i) - s.candidates.get(i).get(b))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(d, 0.0, "row {i} did not keep candidate {b}");
        let z_t = unclip_diffusion::l2_normalize(&h.text.text_embeds.get(i).unsqueeze(0)).unwrap();
        let score = (s.image_embeds.get(i) * z_t.squeeze())
            .sum(Kind::Float)
            .double_value(&[]);
        assert!((score - s.scores.max_dim(1, false).0.double_value(&[i])).abs() < 1e-5);
    }
}

#[test]
fn resumed_training_ends_with_identical_weights() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), false);
    // Text features from the CLIP text encoder on the fly; guidance dropout and data position
    // must resume exactly too.
    let full = config(&dir, 20, "clip");
    let (vs_full, _, _) = train(&full, &tmp.path().join("full"), false);
    let half = config(&dir, 10, "clip");
    let run = tmp.path().join("split");
    train(&half, &run, false);
    let (vs_split, _, summary) = train(&full, &run, true);
    assert!(summary.resumed_from.is_some());
    for (name, a) in unclip_train::named_variables(&vs_full) {
        let b = &vs_split.variables()[&name];
        assert!(a.equal(b), "{name} differs after resume");
    }
}

#[test]
fn stored_and_encoded_text_features_agree_and_missing_ones_are_named() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), true);
    let encoder = CaptionEncoder::load(&dir.join("clip"), Device::Cpu).unwrap();
    let reader = unclip_data::reader::ShardReader::with_parser(
        &unclip_data::reader::ReaderConfig::in_order(
            dir.join("emb/val-000000.tar").display().to_string(),
        ),
        0,
        unclip_data::embeddings::parse_embedding_sample,
    )
    .unwrap();
    let samples: Vec<EmbeddingSample> = reader.iter().take(8).collect();
    let stored = stored_condition(&samples, 16, 32, Device::Cpu).unwrap();
    let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
    let encoded = encoder.encode(&captions).unwrap();
    assert!(stored.mask.equal(&encoded.mask));
    let masked = |t: &Tensor, m: &Tensor| t * m.unsqueeze(-1).to_kind(Kind::Float);
    let diff = (masked(&stored.tokens, &stored.mask) - masked(&encoded.tokens, &encoded.mask))
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff < 1e-2,
        "stored (f16) vs encoded token features differ by {diff}"
    );
    // Shards without token features: the error names the sample and the fix.
    let no_tokens = tempfile::tempdir().unwrap();
    let dir = dataset(no_tokens.path(), false);
    let cfg = config(&dir, 10, "stored");
    let vs = nn::VarStore::new(Device::Cpu);
    let err = PriorTask::new(&vs, &cfg.task, 0, 8, 0, 1).err().unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("txt_tokens") && msg.contains("\"000000\""),
        "{msg}"
    );
}

#[test]
fn a_clip_that_does_not_fit_the_prior_is_an_error_before_training() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), true);
    let mut cfg = config(&dir, 10, "stored");
    cfg.task.prior.model.as_mut().unwrap().num_embeddings = 77;
    let vs = nn::VarStore::new(Device::Cpu);
    let err = PriorTask::new(&vs, &cfg.task, 0, 8, 0, 1).err().unwrap();
    assert!(err.to_string().contains("num_embeddings"), "{err}");
}
