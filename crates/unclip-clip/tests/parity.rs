//! CLIP against transformers' CLIPModel and open_clip with the same random weights
//! (scripts/fixtures/clip.py): embeddings, per-token features, loss; and open_clip's ResNet image
//! tower in evaluation and training mode.
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};
mod common;

use common::tiny_vit;
use unclip_clip::config::{ClipConfig, VisionConfig};
use unclip_clip::convert::{load_clip_weights, read_clip_weights};
use unclip_clip::loss::contrastive_loss;
use unclip_clip::Clip;
use unclip_testkit::max_abs_diff;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// open_clip's `CLIPVisionCfg(layers=(1, 2, 1, 1), width=16, image_size=64)`: 512 final channels,
/// 8 heads (open_clip's width·32/64).
fn resnet_config() -> ClipConfig {
    let mut cfg = tiny_vit(64, 96);
    cfg.vision = VisionConfig {
        image_size: 64,
        patch_size: 0,
        width: 16,
        layers: 0,
        heads: 8,
        mlp_width: None,
        resnet_layers: vec![1, 2, 1, 1],
    };
    cfg
}

fn check(weights: &str, io: &str, cfg: &ClipConfig) -> (nn::VarStore, Clip) {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = Clip::new(vs.root(), cfg).unwrap();
    let w = read_clip_weights(&fixture(weights)).unwrap();
    load_clip_weights(&vs, &w, "", weights).unwrap();
    let io: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(fixture(io))
        .unwrap()
        .into_iter()
        .collect();
    let _g = tch::no_grad_guard();
    let text = model.encode_text(&io["ids"]).unwrap();
    let image = model.encode_image(&io["pixels"]).unwrap();
    let tol = 1e-4;
    let d = max_abs_diff(&text.embeds, &io["text_proj"]);
    assert!(d <= tol, "{weights}: text embeddings off by {d}");
    let d = max_abs_diff(&image, &io["image_proj"]);
    assert!(d <= tol, "{weights}: image embeddings off by {d}");
    let d = max_abs_diff(&text.tokens, &io["tokens"]);
    assert!(d <= tol, "{weights}: token features off by {d}");
    let out = contrastive_loss(&image, &text.embeds, &model.logit_scale(), None).unwrap();
    let d = (out.loss.double_value(&[]) - io["loss"].double_value(&[0])).abs();
    assert!(d <= tol, "{weights}: loss off by {d}");
    if let Some(want) = io.get("logits_per_image") {
        let d = max_abs_diff(&out.logits_per_image, want);
        assert!(d <= tol, "{weights}: logits off by {d}");
    }
    assert_eq!(text.tokens.kind(), Kind::Float);
    (vs, model)
}

#[test]
fn matches_transformers_clip_model() {
    check(
        "hf_clip/model.safetensors",
        "hf_io.safetensors",
        &tiny_vit(64, 96),
    );
}

#[test]
fn matches_open_clip_through_the_name_mapping() {
    check(
        "open_clip.safetensors",
        "open_clip_io.safetensors",
        &tiny_vit(64, 96),
    );
}

#[test]
fn matches_open_clip_resnet_in_eval_and_training_mode() {
    let (vs, model) = check(
        "open_clip_rn.safetensors",
        "open_clip_rn_io.safetensors",
        &resnet_config(),
    );
    let io: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture("open_clip_rn_io.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let _g = tch::no_grad_guard();
    assert!(
        !model.is_training(),
        "a built CLIP starts in evaluation mode"
    );
    model.set_training(true);
    let train = model.encode_image(&io["pixels"]).unwrap();
    let d = max_abs_diff(&train, &io["image_proj_train"]);
    assert!(d <= 1e-4, "training-mode image embeddings off by {d}");
    // The pass moved the running averages as torch's momentum-0.1 update does.
    let running_var = &vs.variables()["visual.layer2.1.bn2.running_var"];
    let d = max_abs_diff(running_var, &io["layer2.1.bn2.running_var"]);
    assert!(d <= 1e-5, "running variance off by {d}");
    model.set_training(false);
    let eval = model.encode_image(&io["pixels"]).unwrap();
    let d = max_abs_diff(&eval, &io["image_proj"]);
    assert!(
        d > 1e-3,
        "evaluation mode must use the (moved) running statistics: {d}"
    );
    assert!(max_abs_diff(&eval, &train) > 1e-2);
}

#[test]
fn wrong_shapes_and_missing_weights_are_named() {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let mut cfg = tiny_vit(64, 96);
    cfg.text.width = 64;
    cfg.text.mlp_width = Some(128);
    let _model = Clip::new(vs.root(), &cfg).unwrap();
    let w = read_clip_weights(&fixture("hf_clip/model.safetensors")).unwrap();
    let err = load_clip_weights(&vs, &w, "", "hf_clip")
        .unwrap_err()
        .to_string();
    assert!(err.contains("hf_clip") && err.contains("shape"), "{err}");
    let mut w = w;
    w.remove("logit_scale");
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let _model = Clip::new(vs.root(), &tiny_vit(64, 96)).unwrap();
    let err = load_clip_weights(&vs, &w, "", "hf_clip")
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing weight logit_scale"), "{err}");
}
