//! Reference outputs of a prior, decoder and upsampler run on fixed inputs, for
//! `scripts/check/export_in_diffusers.py`, which runs the same inputs through the directory
//! `export` wrote and compares.
//!
//!     cargo run --release -p unclip-cli --example export_reference -- runs/prior runs/decoder-eps \
//!         runs/upsampler-eps runs/unclip-diffusers/reference.safetensors

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use unclip_cli::pipeline::Pipeline;
use unclip_decoder::DecoderCondition;
use unclip_prior::Prior;
use unclip_upsampler::low_res::upsample_condition;

/// The captions both sides encode (the script has the same list).
const CAPTIONS: [&str; 2] = [
    "a red circle",
    "a small blue square and a large yellow star",
];

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    ensure!(
        args.len() == 4,
        "usage: export_reference PRIOR_RUN DECODER_RUN UPSAMPLER_RUN OUT.safetensors"
    );
    let pipeline = Pipeline::load(Some(&args[0]), &args[1], None, Device::Cpu)?
        .with_upsamplers(std::slice::from_ref(&args[2]))?;
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let text = pipeline.encoder.encode(&CAPTIONS)?;
    let t = Tensor::from_slice(&[500i64, 20]);
    let prior = pipeline.prior.as_ref().context("a prior run")?;
    let Prior::Diffusion(model) = &prior.model else {
        anyhow::bail!("a diffusion prior run");
    };
    let d = text.text_embeds.size()[1];
    let prior_x = Tensor::randn([2, d], (Kind::Float, Device::Cpu));
    let prior_out = model.forward_t(&prior_x, &t, &text, false)?;

    let r = pipeline.decoder.resolution();
    let decoder_x = Tensor::randn([2, 3, r, r], (Kind::Float, Device::Cpu));
    let z_i = unclip_diffusion::l2_normalize(&Tensor::randn([2, d], (Kind::Float, Device::Cpu)))?;
    let cond = DecoderCondition {
        image_embeds: z_i.shallow_clone(),
        text: text.index_select(&Tensor::from_slice(&[0i64, 1]))?,
    };
    let decoder_out = pipeline
        .decoder
        .model
        .forward_t(&decoder_x, &t, &cond, false)?;

    let up = &pipeline.upsamplers[0];
    let side = up.resolution();
    let low = Tensor::rand([2, 3, r, r], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let upsampler_x = Tensor::randn([2, 3, side, side], (Kind::Float, Device::Cpu));
    let upsampler_out =
        up.model
            .forward_t(&upsampler_x, &upsample_condition(&low, side), &t, false)?;

    let tensors = [
        ("t", t),
        ("z_t", text.text_embeds),
        ("prior_x", prior_x),
        ("prior_out", prior_out),
        ("z_i", z_i),
        ("decoder_x", decoder_x),
        ("decoder_out", decoder_out),
        ("low", low),
        ("upsampler_x", upsampler_x),
        ("upsampler_out", upsampler_out),
    ];
    Tensor::write_safetensors(&tensors, &args[3])
        .with_context(|| format!("writing {}", args[3].display()))?;
    println!("wrote {}", args[3].display());
    Ok(())
}
