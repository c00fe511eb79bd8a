//! The decoder's blocks against diffusers with the same random weights (scripts/fixtures/decoder.py).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};
use unclip_decoder::{AddedKvAttention, TextProj};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(vs: &nn::VarStore, name: &str) -> HashMap<String, Tensor> {
    let weights: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture(&format!("{name}_weights.safetensors")))
            .unwrap()
            .into_iter()
            .collect();
    unclip_train::trainer::load_into(vs, &weights, name).unwrap();
    Tensor::read_safetensors(fixture(&format!("{name}_io.safetensors")))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn added_kv_attention_matches_diffusers() {
    let vs = nn::VarStore::new(Device::Cpu);
    let attn = AddedKvAttention::new(vs.root(), 32, 4, 8, 24, 8).unwrap();
    let io = load(&vs, "added_kv_attention");
    let _g = tch::no_grad_guard();
    let mask = io["mask"].to_kind(Kind::Bool);
    let out = attn.forward(&io["x"], &io["context"], Some(&mask)).unwrap();
    let d = max_diff(&out, &io["out"]);
    assert!(d <= 1e-4, "attention differs by {d}");
    // The mask matters: without it the first row (2 padded tokens) changes, the second does not.
    let unmasked = attn.forward(&io["x"], &io["context"], None).unwrap();
    assert!(max_diff(&unmasked.get(0), &io["out"].get(0)) > 1e-3);
    assert!(max_diff(&unmasked.get(1), &io["out"].get(1)) <= 1e-4);
}

#[test]
fn text_proj_matches_diffusers() {
    let vs = nn::VarStore::new(Device::Cpu);
    let proj = TextProj::new(vs.root(), 16, 4, 40, 24);
    let io = load(&vs, "text_proj");
    let _g = tch::no_grad_guard();
    let c = proj.forward(&io["z_i"], &io["z_t"], &io["tokens"]).unwrap();
    assert!(max_diff(&c.context, &io["context"]) <= 1e-4);
    assert!(max_diff(&c.time_add, &io["time_add"]) <= 1e-4);
    let err = proj
        .forward(&io["z_i"], &io["z_t"], &io["tokens"].narrow(2, 0, 8))
        .unwrap_err();
    assert!(err.to_string().contains("token features"), "{err}");
}

#[test]
fn unet_matches_diffusers_unclip_layout() {
    let cfg = unclip_decoder::UNetConfig {
        in_channels: 3,
        out_channels: 6,
        block_out_channels: vec![16, 32],
        down_block_types: vec![
            "ResnetDownsampleBlock2D".into(),
            "SimpleCrossAttnDownBlock2D".into(),
        ],
        up_block_types: vec![
            "SimpleCrossAttnUpBlock2D".into(),
            "ResnetUpsampleBlock2D".into(),
        ],
        layers_per_block: 2,
        cross_attention_dim: 24,
        attention_head_dim: 8,
        norm_num_groups: 4,
        norm_eps: 1e-5,
        dropout: 0.0,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = unclip_decoder::UNet::new(vs.root(), &cfg).unwrap();
    let io = load(&vs, "unet");
    let _g = tch::no_grad_guard();
    let mask = io["mask"].to_kind(Kind::Bool);
    let out = unet
        .forward_t(
            &io["x"],
            &io["t"],
            &io["class_emb"],
            &io["context"],
            Some(&mask),
            false,
        )
        .unwrap();
    let d = max_diff(&out, &io["out"]);
    assert!(d <= 1e-4, "unet differs by {d}");
}
