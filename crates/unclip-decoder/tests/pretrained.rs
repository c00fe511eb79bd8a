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
