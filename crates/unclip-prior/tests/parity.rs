//! The prior against diffusers' PriorTransformer with the same random weights
//! (scripts/fixtures/prior.py), in Karlo's layout and with the optional input LayerNorms.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};
use unclip_prior::load::load_prior_weights;
use unclip_prior::{DiffusionPrior, PriorConfig, TextCondition};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn check(name: &str) {
    let cfg_text = std::fs::read_to_string(fixture(&format!("{name}_config.json"))).unwrap();
    let cfg = PriorConfig::from_diffusers_json(&cfg_text, name).unwrap();
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = DiffusionPrior::new(vs.root(), &cfg).unwrap();
    load_prior_weights(&vs, &fixture(&format!("{name}_weights.safetensors"))).unwrap();
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture(&format!("{name}_io.safetensors")))
            .unwrap()
            .into_iter()
            .collect();
    let text = TextCondition {
        text_embeds: io["z_t"].shallow_clone(),
        tokens: io["tokens"].shallow_clone(),
        mask: io["mask"].to_kind(Kind::Bool),
    };
    let _g = tch::no_grad_guard();
    let out = model.forward_t(&io["x_t"], &io["t"], &text, false).unwrap();
    let diff = (&out - &io["out"]).abs().max().double_value(&[]);
    assert!(diff <= 1e-4, "{name}: prediction differs by {diff}");
    let post = model.unstandardize(&out);
    let diff = (&post - &io["post"]).abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4,
        "{name}: post-processed prediction differs by {diff}"
    );
    // The round trip through the standardisation is the identity.
    let back = model.unstandardize(&model.standardize(&io["x_t"]));
    assert!((&back - &io["x_t"]).abs().max().double_value(&[]) < 1e-5);
}

#[test]
fn matches_diffusers_prior_transformer_karlo_layout() {
    check("karlo");
}

#[test]
fn matches_diffusers_prior_transformer_with_input_norms() {
    check("norms");
}

#[test]
fn padding_tokens_do_not_change_the_prediction() {
    // Features behind the mask must be ignored: what makes batched captions of any length work.
    let cfg_text = std::fs::read_to_string(fixture("karlo_config.json")).unwrap();
    let cfg = PriorConfig::from_diffusers_json(&cfg_text, "karlo").unwrap();
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = DiffusionPrior::new(vs.root(), &cfg).unwrap();
    load_prior_weights(&vs, &fixture("karlo_weights.safetensors")).unwrap();
    let io: HashMap<String, Tensor> = Tensor::read_safetensors(fixture("karlo_io.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let mask = io["mask"].to_kind(Kind::Bool);
    let junk = io["tokens"].randn_like() * 100.0;
    let tokens = io["tokens"].where_self(&mask.unsqueeze(-1), &junk);
    let text = TextCondition {
        text_embeds: io["z_t"].shallow_clone(),
        tokens,
        mask,
    };
    let _g = tch::no_grad_guard();
    let out = model.forward_t(&io["x_t"], &io["t"], &text, false).unwrap();
    assert!((&out - &io["out"]).abs().max().double_value(&[]) <= 1e-4);
}

#[test]
fn bad_shapes_and_configs_are_errors() {
    let mut cfg = PriorConfig {
        num_attention_heads: 2,
        attention_head_dim: 4,
        num_layers: 1,
        embedding_dim: 6,
        num_embeddings: 5,
        ..Default::default()
    };
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = DiffusionPrior::new(vs.root(), &cfg).unwrap();
    let text = TextCondition {
        text_embeds: Tensor::zeros([2, 6], (Kind::Float, tch::Device::Cpu)),
        tokens: Tensor::zeros([2, 4, 6], (Kind::Float, tch::Device::Cpu)),
        mask: Tensor::ones([2, 4], (Kind::Bool, tch::Device::Cpu)),
    };
    let x = Tensor::zeros([2, 6], (Kind::Float, tch::Device::Cpu));
    let t = Tensor::zeros([2], (Kind::Int64, tch::Device::Cpu));
    let err = model.forward_t(&x, &t, &text, false).unwrap_err();
    assert!(err.to_string().contains("token features"), "{err}");
    cfg.added_emb_type = None;
    let err = cfg.validate().unwrap_err();
    assert!(err.to_string().contains("added_emb_type"), "{err}");
}
