//! `export`: a trained prior, decoder and upsampler, with their CLIP's text encoder and tokenizer,
//! as one diffusers `UnCLIPPipeline` directory (Karlo's layout): `model_index.json`, `prior/`,
//! `decoder/`, `text_proj/`, `super_res_first/`, `super_res_last/` (the same upsampler),
//! `text_encoder/` (transformers' `CLIPTextModelWithProjection`), `tokenizer/` (`CLIPTokenizer`)
//! and the three `UnCLIPScheduler`s. What diffusers' pipeline cannot run the same way is refused,
//! naming the config key.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tch::Tensor;
use unclip_clip::config::Activation;
use unclip_clip::load::LoadedClip;
use unclip_data::tokenizer::ClipTokenizer;
use unclip_diffusion::{ClipDenoised, DiffusionConfig, MeanType, VarianceType};
use unclip_prior::Prior;

use crate::pipeline::Pipeline;

/// The diffusers version whose layout this writes (and the check script loads).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// An `UnCLIPScheduler` config for a process trained as `d` and sampled with `clip`; `key` names
/// the config section in errors (e.g. `decoder`).
pub fn unclip_scheduler(d: &DiffusionConfig, clip: &ClipDenoised, key: &str) -> Result<Value> {
    ensure!(
        d.schedule == unclip_diffusion::BetaSchedule::Cosine,
        "{key}.diffusion.schedule is {:?}: diffusers' UnCLIPScheduler has only the cosine \
         (squaredcos_cap_v2) schedule",
        d.schedule
    );
    let prediction = match d.predict {
        MeanType::Epsilon => "epsilon",
        MeanType::X0 => "sample",
        MeanType::V => bail!(
            "{key}.diffusion.predict is v: diffusers' UnCLIPScheduler steps only epsilon and x0 \
             (`sample`) predictions, so UnCLIPPipeline could not sample this model"
        ),
    };
    let variance = match d.variance {
        VarianceType::FixedSmall => "fixed_small_log",
        VarianceType::LearnedRange => "learned_range",
        VarianceType::FixedLarge => bail!(
            "{key}.diffusion.variance is fixed_large: diffusers' UnCLIPScheduler has only \
             fixed_small_log and learned_range"
        ),
    };
    let (clip_sample, range) = match clip {
        ClipDenoised::None => (false, 1.0),
        ClipDenoised::Static(r) => (true, *r),
        ClipDenoised::Dynamic { .. } => bail!(
            "{key}.sampling.clip is dynamic thresholding: diffusers' UnCLIPScheduler clips \
             statically or not at all"
        ),
    };
    Ok(json!({
        "_class_name": "UnCLIPScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": d.timesteps,
        "variance_type": variance,
        "clip_sample": clip_sample,
        "clip_sample_range": range,
        "prediction_type": prediction,
    }))
}

/// transformers' `CLIPTextModelWithProjection` config of `clip`'s text tower.
pub fn text_encoder_config(clip: &LoadedClip, tokenizer: &ClipTokenizer) -> Value {
    let cfg = &clip.model.cfg;
    let t = &cfg.text;
    let act = match cfg.activation {
        Activation::QuickGelu => "quick_gelu",
        Activation::Gelu => "gelu",
    };
    json!({
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.width,
        "intermediate_size": t.mlp(),
        "projection_dim": cfg.embed_dim,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "max_position_embeddings": t.context_length,
        "hidden_act": act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.sot_id(),
        // Not 2: transformers then pools at the first end token, which padding with it keeps.
        "eos_token_id": tokenizer.eot_id(),
        "pad_token_id": 1,
    })
}

/// Writes `clip`'s text tower as a transformers `CLIPTextModelWithProjection` directory.
pub fn write_text_encoder(clip: &LoadedClip, tokenizer: &ClipTokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_json(
        &dir.join("config.json"),
        &text_encoder_config(clip, tokenizer),
    )?;
    let mut tensors: Vec<(String, Tensor)> = clip
        .vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with("text_model.") || n == "text_projection.weight")
        .map(|(n, t)| (n, t.to_device(tch::Device::Cpu)))
        .collect();
    ensure!(
        tensors.iter().any(|(n, _)| n == "text_projection.weight"),
        "{}: no text_projection.weight to export",
        clip.source
    );
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let path = dir.join("model.safetensors");
    Tensor::write_safetensors(&tensors, &path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes transformers' `CLIPTokenizer` files for `tokenizer` with `context_length` tokens:
/// padding with the end token, as the UnCLIP pipeline's tokenizer pads (the mask hides it).
pub fn write_tokenizer(tokenizer: &ClipTokenizer, context_length: i64, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_json(
        &dir.join("vocab.json"),
        &Value::Object(tokenizer.hf_vocab()),
    )?;
    let merges = dir.join("merges.txt");
    std::fs::write(&merges, tokenizer.hf_merges())
        .with_context(|| format!("writing {}", merges.display()))?;
    let special = json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    });
    write_json(&dir.join("special_tokens_map.json"), &special)?;
    let mut config = special;
    for (k, v) in [
        ("tokenizer_class", json!("CLIPTokenizer")),
        ("model_max_length", json!(context_length)),
        ("do_lower_case", json!(true)),
        ("errors", json!("replace")),
    ] {
        config[k] = v;
    }
    write_json(&dir.join("tokenizer_config.json"), &config)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The scheduler configs of `pipeline`'s stages, or the first reason diffusers' UnCLIPPipeline
/// could not run them as this framework does.
fn schedulers(pipeline: &Pipeline) -> Result<Vec<(&'static str, Value)>> {
    let prior = pipeline
        .prior
        .as_ref()
        .context("export needs a prior (--prior RUN): UnCLIPPipeline starts from one")?;
    let Prior::Diffusion(_) = &prior.model else {
        bail!(
            "the prior of {} is autoregressive (prior.kind): diffusers' UnCLIPPipeline has only \
             the diffusion prior",
            prior.source
        );
    };
    let p = &prior.cfg.prior;
    let d = &pipeline.decoder.cfg.decoder;
    let mut out = vec![
        (
            "prior_scheduler",
            unclip_scheduler(&p.diffusion, &p.sampling.clip, "prior")?,
        ),
        (
            "decoder_scheduler",
            unclip_scheduler(&d.diffusion, &d.sampling.clip, "decoder")?,
        ),
    ];
    ensure!(
        pipeline.upsamplers.len() <= 1,
        "UnCLIPPipeline has one upsampling stage, not {}",
        pipeline.upsamplers.len()
    );
    if let Some(u) = pipeline.upsamplers.first() {
        let u = &u.cfg.upsampler;
        out.push((
            "super_res_scheduler",
            unclip_scheduler(&u.diffusion, &u.sampling.clip, "upsampler")?,
        ));
    }
    Ok(out)
}

/// Writes `pipeline` (its prior, decoder, upsampler if any, and their CLIP's text encoder) as a
/// diffusers `UnCLIPPipeline` directory `out`, which must not exist: everything is written into a
/// staging directory, synced and renamed at the end, so `out` is complete or absent. Returns the
/// components written. Without an upsampler the `super_res_*` entries are null: the components
/// load one by one, but `UnCLIPPipeline.__call__` needs them.
pub fn export_unclip_pipeline(pipeline: &Pipeline, out: &Path) -> Result<Vec<String>> {
    let schedulers = schedulers(pipeline)?;
    ensure!(
        !out.exists(),
        "{} exists: export writes a new directory",
        out.display()
    );
    let prior = pipeline.prior.as_ref().context("export needs a prior")?;
    let index = unclip_train::publish::write_dir(out, |partial| {
        unclip_prior::load::save_diffusers_prior(
            &prior.vs,
            prior.cfg.prior.diffusion_model()?,
            &partial.join("prior"),
        )?;
        unclip_decoder::save_diffusers_decoder(
            &pipeline.decoder.vs,
            &pipeline.decoder.cfg.decoder.model,
            pipeline.decoder.resolution(),
            partial,
        )?;
        let tokenizer = ClipTokenizer::new();
        let clip = &pipeline.encoder.clip;
        write_text_encoder(clip, &tokenizer, &partial.join("text_encoder"))?;
        write_tokenizer(
            &tokenizer,
            clip.model.cfg.text.context_length,
            &partial.join("tokenizer"),
        )?;
        let mut index = json!({
            "_class_name": "UnCLIPPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "prior": ["diffusers", "PriorTransformer"],
            "decoder": ["diffusers", "UNet2DConditionModel"],
            // Where diffusers 0.42 keeps the class (UnCLIP is a deprecated pipeline there); its
            // loader finds it once UnCLIPPipeline is imported. Karlo's "unclip" no longer resolves.
            "text_proj": ["diffusers.pipelines.deprecated.unclip.text_proj", "UnCLIPTextProjModel"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "super_res_first": [null, null],
            "super_res_last": [null, null],
            "prior_scheduler": ["diffusers", "UnCLIPScheduler"],
            "decoder_scheduler": ["diffusers", "UnCLIPScheduler"],
            "super_res_scheduler": [null, null],
        });
        if let Some(u) = pipeline.upsamplers.first() {
            for name in ["super_res_first", "super_res_last"] {
                unclip_upsampler::diffusers::save_diffusers_upsampler(
                    &u.vs,
                    &u.cfg.upsampler.model,
                    u.resolution(),
                    &partial.join(name),
                )?;
                index[name] = json!(["diffusers", "UNet2DModel"]);
            }
            index["super_res_scheduler"] = json!(["diffusers", "UnCLIPScheduler"]);
        }
        for (name, config) in &schedulers {
            let dir = partial.join(name);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            write_json(&dir.join("scheduler_config.json"), config)?;
        }
        write_json(&partial.join("model_index.json"), &index)?;
        Ok(index)
    })?;
    let mut written: Vec<String> = index
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, v)| !k.starts_with('_') && !v[0].is_null())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    written.sort();
    Ok(written)
}
