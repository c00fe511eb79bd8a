//! The decoder's blocks against diffusers with the same random weights (scripts/fixtures/decoder.py).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};
use unclip_clip::caption::TextCondition;
use unclip_decoder::{AddedKvAttention, DecoderCondition, TextProj, UnclipDecoder};
use unclip_testkit::max_abs_diff;
use unclip_train::precision::Precision;

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

/// The attention block with the fixture's weights, its inputs and outputs, and its bool mask.
fn added_kv_attention_fixture() -> (
    nn::VarStore,
    AddedKvAttention,
    HashMap<String, Tensor>,
    Tensor,
) {
    let vs = nn::VarStore::new(Device::Cpu);
    let attn = AddedKvAttention::new(vs.root(), 32, 4, 8, 24, 8).unwrap();
    let io = load(&vs, "added_kv_attention");
    let mask = io["mask"].to_kind(Kind::Bool);
    (vs, attn, io, mask)
}

#[test]
fn added_kv_attention_matches_diffusers() {
    let (_vs, attn, io, mask) = added_kv_attention_fixture();
    let _g = tch::no_grad_guard();
    let out = attn.forward(&io["x"], &io["context"], Some(&mask)).unwrap();
    let d = max_abs_diff(&out, &io["out"]);
    assert!(d <= 1e-4, "attention differs by {d}");
    // The mask matters: without it the first row (2 padded tokens) changes, the second does not.
    let unmasked = attn.forward(&io["x"], &io["context"], None).unwrap();
    assert!(max_abs_diff(&unmasked.get(0), &io["out"].get(0)) > 1e-3);
    assert!(max_abs_diff(&unmasked.get(1), &io["out"].get(1)) <= 1e-4);
}

#[test]
fn added_kv_attention_under_bf16_autocast_stays_near_diffusers_fp32() {
    // Under bf16 the projections and SDPA run in bf16 (SDPA accumulates its softmax in f32):
    // the output (the residual sum, in the input's fp32) must stay within bf16's rounding of
    // diffusers' fp32 output, with the mask kept.
    let (_vs, attn, io, mask) = added_kv_attention_fixture();
    let _g = tch::no_grad_guard();
    let _autocast = unclip_train::precision::autocast(Device::Cpu, Precision::Bf16);
    let out = attn.forward(&io["x"], &io["context"], Some(&mask)).unwrap();
    let out = out.to_kind(Kind::Float);
    let scale = io["out"].abs().max().double_value(&[]);
    let d = max_abs_diff(&out, &io["out"]);
    assert!(
        d <= 0.01 * scale,
        "bf16 attention differs by {d} (output scale {scale})"
    );
    let unmasked = attn.forward(&io["x"], &io["context"], None).unwrap();
    assert!(max_abs_diff(&unmasked.get(0).to_kind(Kind::Float), &io["out"].get(0)) > 0.03 * scale);
}

#[test]
fn text_proj_matches_diffusers() {
    let vs = nn::VarStore::new(Device::Cpu);
    let proj = TextProj::new(vs.root(), 16, 4, 64, 24);
    let io = load(&vs, "text_proj");
    let _g = tch::no_grad_guard();
    let c = proj.forward(&io["z_i"], &io["z_t"], &io["tokens"]).unwrap();
    assert!(max_abs_diff(&c.context, &io["context"]) <= 1e-4);
    assert!(max_abs_diff(&c.time_add, &io["time_add"]) <= 1e-4);
    let err = proj
        .forward(&io["z_i"], &io["z_t"], &io["tokens"].narrow(2, 0, 8))
        .unwrap_err();
    assert!(err.to_string().contains("token features"), "{err}");
}

fn tiny_unet() -> unclip_decoder::UNetConfig {
    unclip_decoder::UNetConfig {
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
        time_scale_shift: Default::default(),
    }
}

#[test]
fn unet_matches_diffusers_unclip_layout() {
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = unclip_decoder::UNet::new(vs.root(), &tiny_unet()).unwrap();
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
    let d = max_abs_diff(&out, &io["out"]);
    assert!(d <= 1e-4, "unet differs by {d}");
}

/// The tensors of a fixture weights file under `prefix.`.
fn prefixed(name: &str, prefix: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(&format!("{name}_weights.safetensors")))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (format!("{prefix}.{k}"), v))
        .collect()
}

/// diffusers' UnCLIP decoder's inputs and output, and its inputs as our condition.
fn decoder_io() -> (HashMap<String, Tensor>, DecoderCondition) {
    let io: HashMap<String, Tensor> = Tensor::read_safetensors(fixture("decoder_io.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let cond = DecoderCondition {
        image_embeds: io["z_i"].shallow_clone(),
        text: TextCondition {
            text_embeds: io["z_t"].shallow_clone(),
            tokens: io["tokens"].shallow_clone(),
            mask: io["mask"].to_kind(Kind::Bool),
        },
    };
    (io, cond)
}

/// The same modules saved by diffusers' `save_pretrained` as a pipeline directory (`decoder/`,
/// `text_proj/`) load, shape from their config.json files, into the same outputs.
#[test]
fn a_diffusers_pipeline_directory_loads_with_its_outputs() {
    let loaded = unclip_decoder::load_diffusers_decoder(&fixture("pipeline"), Device::Cpu).unwrap();
    let cfg = &loaded.config;
    assert_eq!(cfg.unet, tiny_unet());
    assert_eq!(
        (cfg.clip_embeddings_dim, cfg.clip_extra_context_tokens),
        (16, 4)
    );
    let (io, cond) = decoder_io();
    let _g = tch::no_grad_guard();
    let out = loaded
        .model
        .forward_t(&io["x"], &io["t"], &cond, false)
        .unwrap();
    let d = max_abs_diff(&out, &io["out"]);
    assert!(d <= 1e-4, "loaded decoder differs from diffusers' by {d}");
}

#[test]
fn decoder_matches_the_diffusers_unclip_pipeline_and_drops_conditioning() {
    let vs = nn::VarStore::new(Device::Cpu);
    let decoder = UnclipDecoder::new(vs.root(), &tiny_unet(), 16, 4).unwrap();
    let mut weights = prefixed("unet", "decoder");
    weights.extend(prefixed("text_proj", "text_proj"));
    unclip_train::trainer::load_into(&vs, &weights, "fixtures").unwrap();
    let (io, cond) = decoder_io();
    let _g = tch::no_grad_guard();
    let out = decoder.forward_t(&io["x"], &io["t"], &cond, false).unwrap();
    let d = max_abs_diff(&out, &io["out"]);
    assert!(d <= 1e-4, "decoder differs by {d}");
    // Dropout: row 0 loses its image embedding, row 1 its caption.
    let null = TextCondition {
        text_embeds: Tensor::full([1, 16], 7.0, (Kind::Float, Device::Cpu)),
        tokens: Tensor::full([1, 6, 16], 3.0, (Kind::Float, Device::Cpu)),
        mask: Tensor::from_slice(&[true, true, false, false, false, false]).view([1, 6]),
    };
    let drop_image = Tensor::from_slice(&[true, false]);
    let drop_text = Tensor::from_slice(&[false, true]);
    let dropped = decoder
        .drop_conditioning(&cond, &drop_image, &drop_text, &null)
        .unwrap();
    let learned = &decoder
        .text_proj
        .learned_classifier_free_guidance_embeddings;
    assert!(max_abs_diff(&dropped.image_embeds.get(0), learned) == 0.0);
    assert!(max_abs_diff(&dropped.image_embeds.get(1), &cond.image_embeds.get(1)) == 0.0);
    let (kept, text) = (&cond.text, &dropped.text);
    assert!(max_abs_diff(&text.text_embeds.get(0), &kept.text_embeds.get(0)) == 0.0);
    assert!(max_abs_diff(&text.text_embeds.get(1), &null.text_embeds.get(0)) == 0.0);
    assert!(max_abs_diff(&text.tokens.get(1), &null.tokens.get(0)) == 0.0);
    assert!(text.mask.get(1).equal(&null.mask.get(0)));
    assert!(text.mask.get(0).equal(&kept.mask.get(0)));
}

#[test]
fn a_fresh_decoder_starts_as_diffusers_initialises_it() {
    // PyTorch's nn.Linear / nn.Conv2d defaults, which diffusers keeps: weights and biases uniform in
    // ±1/√fan_in; norms at 1 and 0; the null z_i at 0. A layer built with tch's defaults
    // (√6× wider) or zero-initialised fails here.
    let vs = nn::VarStore::new(Device::Cpu);
    let _decoder = UnclipDecoder::new(vs.root(), &tiny_unet(), 16, 4).unwrap();
    let null = vs
        .variables()
        .remove("text_proj.learned_classifier_free_guidance_embeddings")
        .unwrap();
    assert_eq!(
        null.abs().max().double_value(&[]),
        0.0,
        "the null z_i starts at 0"
    );
    let layers = unclip_testkit::assert_pytorch_default_init(&vs);
    assert!(layers > 30, "only {layers} layers checked");
}
