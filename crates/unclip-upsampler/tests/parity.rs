//! The upsampler against diffusers' `UNet2DModel` with the same random weights, fed as diffusers'
//! UnCLIP pipeline feeds its super-resolution stages (scripts/fixtures/upsampler.py).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Tensor};
use unclip_diffusion::nn::resnet::TimeScaleShift;
use unclip_upsampler::diffusers::{load_diffusers_upsampler, save_diffusers_upsampler};
use unclip_upsampler::low_res::{downsample, upsample_condition};
use unclip_upsampler::{Upsampler, UpsamplerModelConfig};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn io() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture("unet_io.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// A diffusers directory of the fixture: its config.json and weights.
fn diffusers_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("unet_config.json"), dir.path().join("config.json")).unwrap();
    std::fs::copy(
        fixture("unet_weights.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn conditioning_matches_torch_interpolate() {
    let io = io();
    // Antialiased bicubic up (the pipeline's), area down (the trainer's).
    let d = max_diff(&upsample_condition(&io["low"], 16), &io["cond"]);
    assert!(d <= 1e-5, "upsampled conditioning differs by {d}");
    let d = max_diff(&downsample(&io["high"], 8), &io["area"]);
    assert!(d <= 1e-6, "area downsampling differs by {d}");
    // Not plain bicubic (a = −0.75), which differs.
    let plain = io["low"].upsample_bicubic2d([16, 16], false, None, None);
    assert!(max_diff(&plain, &io["cond"]) > 1e-3);
}

#[test]
fn unet_matches_diffusers_unet2dmodel() {
    let dir = diffusers_dir();
    let loaded = load_diffusers_upsampler(dir.path(), Device::Cpu).unwrap();
    assert_eq!(loaded.config.block_out_channels, vec![8, 16]);
    assert_eq!(loaded.config.layers_per_block, 2);
    assert_eq!(loaded.config.out_channels, 6);
    assert_eq!(
        loaded.config.parameter_count(),
        loaded
            .vs
            .variables()
            .values()
            .map(Tensor::numel)
            .sum::<usize>() as i64,
        "counted parameters differ from built ones"
    );
    let io = io();
    let _g = tch::no_grad_guard();
    let cond = upsample_condition(&io["low"], 16);
    let out = loaded
        .model
        .forward_t(&io["x"], &cond, &io["t"], false)
        .unwrap();
    let d = max_diff(&out, &io["out"]);
    assert!(d <= 1e-4, "upsampler output differs from diffusers by {d}");
    // The conditioning is read: another low-resolution image changes the output.
    let other = loaded
        .model
        .forward_t(&io["x"], &cond.flip([0]), &io["t"], false)
        .unwrap();
    assert!(max_diff(&other, &io["out"]) > 1e-2);
}

#[test]
fn export_round_trips_and_keeps_diffusers_config() {
    let src = diffusers_dir();
    let loaded = load_diffusers_upsampler(src.path(), Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_diffusers_upsampler(&loaded.vs, &loaded.config, 16, out.path()).unwrap();
    let again = load_diffusers_upsampler(out.path(), Device::Cpu).unwrap();
    assert_eq!(again.config, loaded.config);
    let a = loaded.vs.variables();
    for (name, t) in again.vs.variables() {
        assert!(t.equal(&a[&name]), "{name} changed in the round trip");
    }
    // Every key diffusers wrote that we also write has diffusers' value.
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("unet_config.json")).unwrap())
            .unwrap();
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    for (key, value) in ours.as_object().unwrap() {
        if key == "_class_name" {
            continue;
        }
        let v = &theirs[key];
        assert!(
            v == value || v.as_f64().zip(value.as_f64()).is_some_and(|(a, b)| a == b),
            "{key}: ours {value}, diffusers {v}"
        );
    }
}

#[test]
fn diffusers_configs_it_cannot_run_are_refused() {
    let theirs: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("unet_config.json")).unwrap())
            .unwrap();
    for (key, value, expect) in [
        ("add_attention", serde_json::json!(true), "add_attention"),
        (
            "resnet_time_scale_shift",
            serde_json::json!("spatial"),
            "resnet_time_scale_shift",
        ),
        ("in_channels", serde_json::json!(3), "in_channels"),
        (
            "down_block_types",
            serde_json::json!(["DownBlock2D", "ResnetDownsampleBlock2D"]),
            "down_block_types",
        ),
        (
            "num_class_embeds",
            serde_json::json!(10),
            "num_class_embeds",
        ),
    ] {
        let mut json = theirs.clone();
        json.insert(key.into(), value);
        let err = UpsamplerModelConfig::from_diffusers_json(&json, "DIR")
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect) && err.contains("DIR"), "{key}: {err}");
    }
    // Unstated, resnet_time_scale_shift is diffusers' default: `default`.
    let read = |json: &serde_json::Map<String, serde_json::Value>| {
        UpsamplerModelConfig::from_diffusers_json(json, "DIR")
            .unwrap()
            .resnet_time_scale_shift
    };
    assert_eq!(read(&theirs), TimeScaleShift::ScaleShift);
    let mut unstated = theirs.clone();
    unstated.remove("resnet_time_scale_shift");
    assert_eq!(read(&unstated), TimeScaleShift::Default);
}

#[test]
fn built_parameter_count_matches_the_formula() {
    for shift in [TimeScaleShift::ScaleShift, TimeScaleShift::Default] {
        let cfg = UpsamplerModelConfig {
            out_channels: 3,
            block_out_channels: vec![16, 32, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            norm_eps: 1e-5,
            dropout: 0.0,
            resnet_time_scale_shift: shift,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        Upsampler::new(vs.root(), &cfg).unwrap();
        let built: usize = vs.variables().values().map(Tensor::numel).sum();
        assert_eq!(built as i64, cfg.parameter_count(), "{shift:?}");
    }
}

/// Loads an exported directory with diffusers' own `UNet2DModel.from_pretrained` and runs it as
/// the UnCLIP pipeline runs `super_res_first`: the low-resolution image upsampled (antialiased
/// bicubic) and concatenated to the noisy one.
const DIFFUSERS_FORWARD: &str = r#"
import sys, torch, torch.nn.functional as F
from safetensors.torch import load_file, save_file
from diffusers import UNet2DModel
d = sys.argv[1]
unet = UNet2DModel.from_pretrained(d + "/unet").eval()
io = load_file(d + "/in.safetensors")
with torch.no_grad():
    side = io["x"].shape[-1]
    up = F.interpolate(io["low"], size=[side, side], mode="bicubic", align_corners=False, antialias=True)
    out = unet(torch.cat([io["x"], up], dim=1), io["t"]).sample
save_file({"out": out.contiguous()}, d + "/out.safetensors")
"#;

/// Both ways of taking the timestep embedding: scale-shift and diffusers' `default` (Karlo's).
#[test]
fn an_upsampler_built_here_runs_the_same_in_diffusers() {
    for shift in [TimeScaleShift::ScaleShift, TimeScaleShift::Default] {
        runs_the_same_in_diffusers(shift);
    }
}

fn runs_the_same_in_diffusers(shift: TimeScaleShift) {
    tch::manual_seed(5);
    let cfg = UpsamplerModelConfig {
        out_channels: 6,
        block_out_channels: vec![8, 16, 16],
        layers_per_block: 2,
        norm_num_groups: 4,
        norm_eps: 1e-5,
        dropout: 0.0,
        resnet_time_scale_shift: shift,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Upsampler::new(vs.root(), &cfg).unwrap();
    // Every weight random, biases and norms included.
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let r = v.randn_like() * 0.2;
            v.copy_(&(&v + r));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    save_diffusers_upsampler(&vs, &cfg, 32, &dir.path().join("unet")).unwrap();
    // Read back: the same config (the mode included) and every tensor.
    let back = load_diffusers_upsampler(&dir.path().join("unet"), Device::Cpu).unwrap();
    assert_eq!(back.config, cfg);
    let ours = vs.variables();
    for (name, t) in back.vs.variables() {
        assert!(
            t.equal(&ours[&name]),
            "{shift:?}: {name} changed in the round trip"
        );
    }
    let x = Tensor::randn([2, 3, 32, 32], (tch::Kind::Float, Device::Cpu));
    let low = Tensor::rand([2, 3, 16, 16], (tch::Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let t = Tensor::from_slice(&[17i64, 901]);
    let ours = tch::no_grad(|| {
        model
            .forward_t(&x, &upsample_condition(&low, 32), &t, false)
            .unwrap()
    });
    Tensor::write_safetensors(
        &[("x", &x), ("low", &low), ("t", &t)],
        dir.path().join("in.safetensors"),
    )
    .unwrap();
    unclip_testkit::python(DIFFUSERS_FORWARD, [dir.path()]);
    let theirs = Tensor::read_safetensors(dir.path().join("out.safetensors")).unwrap();
    let d = max_diff(&theirs[0].1, &ours);
    assert!(
        d <= 1e-4,
        "{shift:?}: diffusers' forward of the export differs by {d}"
    );
    // The timestep is read: another one changes the output.
    let other = tch::no_grad(|| {
        model
            .forward_t(&x, &upsample_condition(&low, 32), &t.flip([0]), false)
            .unwrap()
    });
    assert!(max_diff(&other, &ours) > 1e-3, "{shift:?}");
}
