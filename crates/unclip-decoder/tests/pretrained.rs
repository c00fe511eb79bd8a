//! Diffusers UnCLIP pipeline directories describing another model than this decoder are refused,
//! naming the key (that the fixture pipeline loads with diffusers' outputs: tests/parity.rs).
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use unclip_decoder::load_diffusers_decoder;

fn pipeline() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline")
}

/// A copy of the fixture pipeline with `edit` applied to `component/config.json`.
fn edited(
    component: &str,
    edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for part in ["decoder", "text_proj"] {
        let (src, dst) = (pipeline().join(part), tmp.path().join(part));
        std::fs::create_dir_all(&dst).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
    let path = tmp.path().join(component).join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(&path, json.to_string()).unwrap();
    tmp
}

#[test]
fn configs_of_other_models_are_refused_naming_the_key() {
    let cases: [(&str, &str, serde_json::Value, &str); 4] = [
        (
            "decoder",
            "resnet_time_scale_shift",
            "default".into(),
            "resnet_time_scale_shift",
        ),
        ("decoder", "num_class_embeds", 10.into(), "num_class_embeds"),
        (
            "decoder",
            "attention_head_dim",
            serde_json::json!([8, 16]),
            "attention_head_dim",
        ),
        (
            "text_proj",
            "cross_attention_dim",
            32.into(),
            "cross_attention_dim",
        ),
    ];
    for (component, key, value, named) in cases {
        let dir = edited(component, |m| {
            m.insert(key.into(), value.clone());
        });
        let err = match load_diffusers_decoder(dir.path(), Device::Cpu) {
            Ok(_) => panic!("{component}/{key} = {value} loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(named), "{key}: {err}");
    }
    // A weight the model does not have is named too.
    let dir = edited("decoder", |_| {});
    let file = dir
        .path()
        .join("decoder/diffusion_pytorch_model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).unwrap();
    tensors.push((
        "extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let err = format!(
        "{:#}",
        load_diffusers_decoder(dir.path(), Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("decoder.extra.weight"), "{err}");
}

/// Diffusers' UnCLIP decoder (text_proj, then the UNet with the caption mask padded for the extra
/// tokens) from `save_pretrained`-layout directories; reads in.safetensors, writes out.safetensors.
const DIFFUSERS_FORWARD: &str = r#"
import sys, torch, torch.nn.functional as F
from safetensors.torch import load_file, save_file
from diffusers import UNet2DConditionModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
d = sys.argv[1]
unet = UNet2DConditionModel.from_pretrained(d + "/decoder").eval()
proj = UnCLIPTextProjModel.from_pretrained(d + "/text_proj").eval()
io = load_file(d + "/in.safetensors")
with torch.no_grad():
    ctx, add = proj(image_embeddings=io["z_i"], prompt_embeds=io["z_t"],
                    text_encoder_hidden_states=io["tokens"], do_classifier_free_guidance=False)
    mask = F.pad(io["mask"].bool(), (proj.config.clip_extra_context_tokens, 0), value=True)
    out = unet(io["x"], io["t"], encoder_hidden_states=ctx, class_labels=add, attention_mask=mask).sample
save_file({"out": out.contiguous()}, d + "/out.safetensors")
"#;

#[test]
fn a_decoder_trained_here_exports_to_diffusers_and_back() {
    tch::manual_seed(3);
    let cfg: unclip_decoder::DecoderModelConfig = serde_yaml::from_str(
        "clip_embeddings_dim: 12
clip_extra_context_tokens: 3
unet: {block_out_channels: [8, 16], down_block_types: [ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D],
       up_block_types: [SimpleCrossAttnUpBlock2D, ResnetUpsampleBlock2D], layers_per_block: 1,
       cross_attention_dim: 20, attention_head_dim: 4, norm_num_groups: 4}",
    )
    .unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let model = unclip_decoder::UnclipDecoder::from_config(vs.root(), &cfg).unwrap();
    // Every weight random (zero-initialised output convolutions would hide the blocks).
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let noise = v.randn_like() * 0.2;
            v.copy_(&noise);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    unclip_decoder::save_diffusers_decoder(&vs, &cfg, 8, dir.path()).unwrap();

    let opts = (Kind::Float, Device::Cpu);
    let mask = Tensor::from_slice(&[true, true, false, true, true, true]).view([2, 3]);
    let inputs = [
        ("z_i", Tensor::randn([2, 12], opts)),
        ("z_t", Tensor::randn([2, 12], opts)),
        ("tokens", Tensor::randn([2, 3, 12], opts)),
        ("mask", mask.to_kind(Kind::Uint8)),
        ("x", Tensor::randn([2, 3, 8, 8], opts)),
        ("t", Tensor::from_slice(&[5i64, 900])),
    ];
    let cond = unclip_decoder::DecoderCondition {
        image_embeds: inputs[0].1.shallow_clone(),
        text: unclip_clip::caption::TextCondition {
            text_embeds: inputs[1].1.shallow_clone(),
            tokens: inputs[2].1.shallow_clone(),
            mask,
        },
    };
    let _g = tch::no_grad_guard();
    let ours = model
        .forward_t(&inputs[4].1, &inputs[5].1, &cond, false)
        .unwrap();

    // Back through our loader: the same config and bit-identical outputs.
    let back = load_diffusers_decoder(dir.path(), Device::Cpu).unwrap();
    assert_eq!(back.config, cfg);
    let again = back
        .model
        .forward_t(&inputs[4].1, &inputs[5].1, &cond, false)
        .unwrap();
    assert!(again.equal(&ours));

    // Into diffusers' own from_pretrained: the same outputs.
    Tensor::write_safetensors(&inputs, dir.path().join("in.safetensors")).unwrap();
    unclip_testkit::python(DIFFUSERS_FORWARD, [dir.path()]);
    let theirs = Tensor::read_safetensors(dir.path().join("out.safetensors")).unwrap();
    let d = (&theirs[0].1 - &ours).abs().max().double_value(&[]);
    assert!(d <= 1e-4, "diffusers' forward of the export differs by {d}");
}
