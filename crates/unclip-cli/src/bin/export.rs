//! A trained prior, decoder and upsampler as one diffusers `UnCLIPPipeline` directory.
//!
//!     export --prior runs/prior --decoder runs/decoder --upsampler runs/upsampler --out runs/unclip-diffusers

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use unclip_cli::export::export_unclip_pipeline;
use unclip_cli::pipeline::Pipeline;
use unclip_data::embeddings::ClipEmbeddings;

#[derive(Parser)]
#[command(
    about = "Write a prior, decoder and upsampler run as a diffusers UnCLIPPipeline directory",
    long_about = "Write a prior, decoder and upsampler run (newest checkpoints, EMA weights) and \
        their CLIP's text encoder and tokenizer as a diffusers UnCLIPPipeline directory: \
        model_index.json, prior/ (PriorTransformer), decoder/ (UNet2DConditionModel), text_proj/, \
        super_res_first/ and super_res_last/ (UNet2DModel, the same upsampler), text_encoder/ \
        (transformers' CLIPTextModelWithProjection), tokenizer/ (CLIPTokenizer) and the three \
        UnCLIPSchedulers. A prior or process diffusers' UnCLIPPipeline cannot run as this \
        framework does (the autoregressive prior, v prediction, a linear schedule, dynamic \
        thresholding) is refused, naming the config key. This framework's z_t is L2-normalised: \
        give the pipeline normalised text embeddings (README, `export`)."
)]
struct Cli {
    /// A train-prior run directory (a diffusion prior).
    #[arg(long, value_name = "RUN")]
    prior: PathBuf,
    /// A train-decoder run directory.
    #[arg(long, value_name = "RUN")]
    decoder: PathBuf,
    /// This checkpoint of the decoder run (`RUN/checkpoints/step-N`) instead of its newest.
    #[arg(long, value_name = "DIR")]
    decoder_checkpoint: Option<PathBuf>,
    /// A train-upsampler run directory: UnCLIPPipeline's super-resolution stage. Without it the
    /// super_res_* entries are null (the components load one by one; the pipeline cannot run).
    #[arg(long, value_name = "RUN")]
    upsampler: Option<PathBuf>,
    /// The directory to write; it must not exist.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let pipeline = Pipeline::load(
        Some(&cli.prior),
        &cli.decoder,
        cli.decoder_checkpoint.as_deref(),
        tch::Device::Cpu,
    )?
    .with_upsamplers(cli.upsampler.as_slice())?;
    let written = export_unclip_pipeline(&pipeline, &cli.out)?;
    if let Some(prior) = &pipeline.prior {
        println!("prior {}", prior.source);
    }
    println!("decoder {}", pipeline.decoder.source);
    for u in &pipeline.upsamplers {
        println!("upsampler {}", u.source);
    }
    println!("text encoder {}", pipeline.encoder.clip.source);
    println!(
        "wrote {} (UnCLIPPipeline: {})",
        cli.out.display(),
        written.join(", ")
    );
    if pipeline.decoder.cfg.decoder.clip_embeddings == ClipEmbeddings::Normalized {
        println!(
            "note: these models were trained on L2-normalised z_t and UnCLIPPipeline passes the \
             text encoder's text_embeds unnormalised: wrap the text encoder as the README's \
             'Export to diffusers' shows (runs trained with clip_embeddings: raw need nothing)"
        );
    }
    Ok(())
}
