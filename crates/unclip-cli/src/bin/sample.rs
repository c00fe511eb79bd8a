//! Text to image with a trained prior, decoder and upsamplers (unCLIP's sampling pipeline).
//!
//!     sample --prior runs/prior --decoder runs/decoder --upsampler runs/upsampler \
//!         --caption "a red circle" --out runs/samples

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use tch::{Kind, Tensor};
use unclip_cli::pipeline::{image_path, parse_precision, Pipeline};
use unclip_diffusion::device::parse_device;
use unclip_prior::prior::describe_sampling;
use unclip_train::precision::resolve;

#[derive(Parser)]
#[command(
    about = "Sample images for captions: CLIP text encoder → prior → decoder → upsamplers (unCLIP's pipeline)"
)]
struct Cli {
    /// A caption to sample images for. Repeatable.
    #[arg(
        long = "caption",
        value_name = "TEXT",
        required_unless_present = "captions"
    )]
    caption: Vec<String>,
    /// A text file of captions, one per line (blank lines skipped); after any --caption.
    #[arg(long, value_name = "FILE")]
    captions: Option<PathBuf>,
    /// A train-prior run directory (its newest checkpoint, EMA weights).
    #[arg(long, value_name = "RUN", required_unless_present = "no_prior")]
    prior: Option<PathBuf>,
    /// Decode z_t itself instead of a prior's sample: the paper's zero-shot baseline.
    #[arg(long, conflicts_with = "prior")]
    no_prior: bool,
    /// A train-decoder run directory (its newest checkpoint, EMA weights).
    #[arg(long, value_name = "RUN")]
    decoder: PathBuf,
    /// This checkpoint of the decoder run (`RUN/checkpoints/step-N`) instead of its newest.
    #[arg(long, value_name = "DIR")]
    decoder_checkpoint: Option<PathBuf>,
    /// A train-upsampler run directory (newest checkpoint, EMA weights) to upsample the decoder's
    /// images with; repeat for the second stage (64→256, then 256→1024).
    #[arg(long, value_name = "RUN")]
    upsampler: Vec<PathBuf>,
    /// Keys of every upsampler's sampler to change, as YAML: e.g. '{steps: ddim10}' (the rest:
    /// each config's upsampler.sampling).
    #[arg(long, value_name = "YAML")]
    upsampler_sampling: Option<String>,
    /// Images per caption.
    #[arg(long, default_value_t = 4)]
    count: usize,
    /// Output directory: one PNG per image (`NNN_KK.png`: caption NNN, draw KK), `grid.png`
    /// (a row per caption) and `samples.json`.
    #[arg(long, default_value = "runs/samples")]
    out: PathBuf,
    /// Seed of all sampling noise.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// The prior's guidance scale (default: the prior config's prior.guidance_scale).
    #[arg(long)]
    prior_guidance: Option<f64>,
    /// Prior draws per image, reranked by z_i · z_t (default: the config's prior.candidates).
    #[arg(long)]
    candidates: Option<usize>,
    /// Keys of the prior's sampling to change, as YAML: a diffusion prior's sampler, e.g.
    /// '{steps: "32"}' (the rest: the config's prior.sampling); an autoregressive prior's
    /// '{temperature: 0.8, dot_quantile: null}' (the rest: its prior.autoregressive).
    #[arg(long, value_name = "YAML")]
    prior_sampling: Option<String>,
    /// The decoder's guidance scale (default: the decoder config's decoder.guidance_scale).
    #[arg(long)]
    decoder_guidance: Option<f64>,
    /// Keys of the decoder's sampler to change, as YAML: e.g. '{sampler: ddim, steps: "50"}' (the
    /// rest: the config's decoder.sampling).
    #[arg(long, value_name = "YAML")]
    decoder_sampling: Option<String>,
    /// Images decoded at once.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// fp32, bf16, fp16 or auto (bf16 on CUDA and AMX CPUs, else fp32).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn captions(cli: &Cli) -> Result<Vec<String>> {
    let mut all = cli.caption.clone();
    if let Some(file) = &cli.captions {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading captions {}", file.display()))?;
        all.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    anyhow::ensure!(
        !all.is_empty(),
        "no captions: give --caption or a non-empty --captions file"
    );
    Ok(all)
}

fn mean(t: &Tensor) -> f64 {
    t.mean(Kind::Float).double_value(&[])
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let captions = captions(&cli)?;
    let device = parse_device(&cli.device)?;
    let precision = parse_precision(&cli.precision)?;
    let pipeline = Pipeline::load(
        cli.prior.as_deref(),
        &cli.decoder,
        cli.decoder_checkpoint.as_deref(),
        device,
    )?
    .with_upsamplers(&cli.upsampler)?;
    let mut o = pipeline.default_options();
    o.count = cli.count;
    o.seed = cli.seed;
    o.batch_size = cli.batch_size;
    o.precision = precision;
    o.prior_guidance = cli.prior_guidance.unwrap_or(o.prior_guidance);
    o.candidates = cli.candidates.unwrap_or(o.candidates);
    o.decoder_guidance = cli.decoder_guidance.unwrap_or(o.decoder_guidance);
    o.override_sampling(
        cli.prior_sampling.as_deref(),
        cli.decoder_sampling.as_deref(),
        cli.upsampler_sampling.as_deref(),
    )?;
    pipeline.check(&o)?;
    let resolved = resolve(o.precision, device);
    match &pipeline.prior {
        Some(run) => println!(
            "prior {}: guidance {}, {} candidates, {}",
            run.source,
            o.prior_guidance,
            o.candidates,
            describe_sampling(&o.prior_sampling)
        ),
        None => println!("no prior: the decoder is given z_t as the image embedding"),
    }
    println!(
        "decoder {}: guidance {}, {}; {} images of {} px per caption, device {device:?}, {}",
        pipeline.decoder.source,
        o.decoder_guidance,
        o.decoder_sampling.describe(),
        o.count,
        pipeline.decoder.resolution(),
        resolved.precision.name()
    );
    for (run, s) in pipeline.upsamplers.iter().zip(&o.upsampler_sampling) {
        println!(
            "upsampler {}: {} → {} px, {}",
            run.source,
            run.low_resolution(),
            run.resolution(),
            s.describe()
        );
    }
    let g = pipeline.generate(&captions, &o)?;

    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let n = captions.len() as i64;
    let k = o.count as i64;
    let mut rows = Vec::new();
    let mut manifest = Vec::new();
    for (i, caption) in captions.iter().enumerate() {
        let row = g.images.narrow(0, i as i64 * k, k);
        for draw in 0..o.count {
            let path = image_path(&cli.out, i, draw);
            let idx = i as i64 * k + draw as i64;
            let img = (row.get(draw as i64).to_device(tch::Device::Cpu) + 1.0) * 0.5;
            unclip_train::logging::write_png(&path, &img.clamp(0.0, 1.0))?;
            manifest.push(serde_json::json!({
                "caption": caption,
                "file": path.file_name().map(|f| f.to_string_lossy().into_owned()),
                "seed": o.seed,
                "draw": draw,
                "clip_score": g.clip_text.double_value(&[idx, i as i64]),
                "clip_image_score": g.clip_image.double_value(&[idx]),
                "prior_score": g.prior_scores.as_ref().map(|s| s.double_value(&[idx])),
            }));
        }
        rows.push(row);
        // cos(CLIP(image), z_t) for its own caption against the other captions'.
        let scores = g.clip_text.narrow(0, i as i64 * k, k);
        let own = mean(&scores.select(1, i as i64));
        let others = if n > 1 {
            // The mean over all n captions' columns, less this caption's, over the other n - 1.
            let all = mean(&scores) * n as f64;
            format!(", other captions {:.4}", (all - own) / (n - 1) as f64)
        } else {
            String::new()
        };
        let prior = g
            .prior_scores
            .as_ref()
            .map(|s| {
                format!(
                    ", prior z_i · z_t {:.4}",
                    mean(&s.narrow(0, i as i64 * k, k))
                )
            })
            .unwrap_or_default();
        println!(
            "{caption:?}: cos(CLIP(image), z_t) {own:.4}{others}; cos(CLIP(image), z_i) {:.4}{prior}",
            mean(&g.clip_image.narrow(0, i as i64 * k, k))
        );
    }
    let grid = unclip_decoder::task::tile_rows(&rows)?;
    unclip_train::logging::write_png(&cli.out.join("grid.png"), &grid)?;
    let json = cli.out.join("samples.json");
    std::fs::write(&json, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!(
        "wrote {} images, grid.png (a row per caption) and samples.json to {}",
        n * k,
        cli.out.display()
    );
    Ok(())
}
