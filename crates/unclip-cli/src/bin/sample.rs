//! Text to image with a trained prior, decoder and upsamplers (unCLIP's sampling pipeline), and
//! unCLIP's image manipulations with the decoder (variations, interpolations, text diffs, the
//! PCA probe).
//!
//!     sample --prior runs/prior --decoder runs/decoder --upsampler runs/upsampler \
//!         --caption "a red circle" --out runs/samples
//!     sample --decoder runs/decoder --variations photo.png --out runs/variations
//!     sample --diffusers karlo-v1-alpha --clip clip-vit-large-patch14 --caption "a red circle"

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{ArgGroup, Parser, ValueEnum};
use tch::{Kind, Tensor};
use unclip_cli::manipulate::{LatentPath, Manipulation};
use unclip_cli::pipeline::{image_path, parse_precision, NoiseOrder, Pipeline};
use unclip_diffusion::device::parse_device;
use unclip_diffusion::FixedPoint;
use unclip_prior::prior::describe_sampling;
use unclip_train::config::with_keys;
use unclip_train::precision::resolve;

/// Text-to-image's arguments, which a manipulation's options conflict with.
const CAPTIONS: [&str; 2] = ["caption", "captions"];

#[derive(Parser)]
#[command(
    about = "Sample images for captions: CLIP text encoder → prior → decoder → upsamplers (unCLIP's \
             pipeline); or manipulate images with the decoder: variations, interpolations, text diffs, \
             the PCA probe",
    group(ArgGroup::new("manipulation")
        .args(["variations", "interpolate", "text_diff", "pca_probe"])
        .conflicts_with_all(["caption", "captions", "prior", "no_prior", "prior_guidance",
                             "candidates", "prior_sampling"]))
)]
struct Cli {
    /// A caption to sample images for. Repeatable.
    #[arg(
        long = "caption",
        value_name = "TEXT",
        required_unless_present_any = ["captions", "manipulation"]
    )]
    caption: Vec<String>,
    /// A text file of captions, one per line (blank lines skipped); after any --caption.
    #[arg(long, value_name = "FILE")]
    captions: Option<PathBuf>,
    /// A train-prior run directory (its newest checkpoint, EMA weights).
    #[arg(
        long,
        value_name = "RUN",
        required_unless_present_any = ["no_prior", "manipulation", "diffusers"]
    )]
    prior: Option<PathBuf>,
    /// Decode z_t itself instead of a prior's sample: the paper's zero-shot baseline.
    #[arg(long, conflicts_with = "prior")]
    no_prior: bool,
    /// A train-decoder run directory (its newest checkpoint, EMA weights).
    #[arg(long, value_name = "RUN", required_unless_present = "diffusers")]
    decoder: Option<PathBuf>,
    /// Instead of runs: a diffusers UnCLIPPipeline directory (Karlo's, or one `export` wrote) —
    /// its prior, decoder, super_res_first and super_res_last, sampled as diffusers' pipeline
    /// samples (manipulations: its decoder and super-resolution); needs --clip.
    #[arg(
        long,
        value_name = "DIR",
        requires = "clip",
        conflicts_with_all = ["prior", "no_prior", "decoder", "decoder_checkpoint", "upsampler"]
    )]
    diffusers: Option<PathBuf>,
    /// With --diffusers: the CLIP (a Hugging Face or train-clip directory) whose text tower is the
    /// pipeline's text_encoder; it encodes the captions and scores the images.
    #[arg(long, value_name = "DIR", requires = "diffusers")]
    clip: Option<PathBuf>,
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
    /// Images per caption (with --variations: variations per image).
    #[arg(long, default_value_t = 4)]
    count: usize,
    /// Variations of an image file: its CLIP embedding z_i and DDIM-inverted latent x_T decoded
    /// with DDIM η = --eta. A row per image: the image, its reconstruction (η = 0), --count
    /// variations. Repeatable.
    #[arg(long, value_name = "IMAGE")]
    variations: Vec<PathBuf>,
    /// Interpolate between two image files: z_i slerped from A's to B's (x_T as --latent says).
    /// A row per pair: A, --frames decodings at θ = 0 … 1, B. Repeatable.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    interpolate: Vec<PathBuf>,
    /// With --interpolate: slerp x_T between the two images' inverted latents (the default: the
    /// ends reconstruct them), or hold one random x_T (fixed).
    #[arg(long, value_enum, conflicts_with_all = CAPTIONS)]
    latent: Option<Latent>,
    /// A text diff of an image file: z_i slerped towards norm(z_t(--to) − z_t(--from)), x_T held.
    /// A row per image: the image, --frames decodings at θ = 0 … --max-theta. Repeatable, with
    /// one --from and one --to per image.
    #[arg(long, value_name = "IMAGE", requires_all = ["from", "to"])]
    text_diff: Vec<PathBuf>,
    /// With --text-diff: the image's own caption.
    #[arg(long = "from", value_name = "TEXT", conflicts_with_all = CAPTIONS)]
    from: Vec<String>,
    /// With --text-diff: the caption to move towards.
    #[arg(long = "to", value_name = "TEXT", conflicts_with_all = CAPTIONS)]
    to: Vec<String>,
    /// The PCA probe of an image file: z_i rebuilt from its first k principal components (k from
    /// --components), each decoded from the same random x_T. A row per image: the image, a
    /// decoding per k, the decoding of z_i itself. Repeatable; needs --pca-embeddings.
    #[arg(long, value_name = "IMAGE", requires = "pca_embeddings")]
    pca_probe: Vec<PathBuf>,
    /// With --pca-probe: the embedding shards (`embed`'s output, brace-expanded) whose image
    /// embeddings the principal components are fitted to.
    #[arg(long, value_name = "SHARDS", conflicts_with_all = CAPTIONS)]
    pca_embeddings: Option<String>,
    /// With --pca-probe: fit the components to at most this many embeddings (in file order;
    /// default 10000).
    #[arg(long, conflicts_with_all = CAPTIONS)]
    pca_samples: Option<usize>,
    /// With --pca-probe: the numbers of components, e.g. 1,4,16 (default: 1, 2, 4, … below the
    /// embedding's width).
    #[arg(long, value_delimiter = ',', conflicts_with_all = CAPTIONS)]
    components: Vec<usize>,
    /// Frames of an interpolation or a text diff (default 8).
    #[arg(long, conflicts_with_all = CAPTIONS)]
    frames: Option<usize>,
    /// With --text-diff: the last frame's θ (default 0.5; the paper: 0.25 to 0.5).
    #[arg(long, conflicts_with_all = CAPTIONS)]
    max_theta: Option<f64>,
    /// With --variations: DDIM's η (default 1; 0 reconstructs, larger changes more).
    #[arg(long, conflicts_with_all = CAPTIONS)]
    eta: Option<f64>,
    /// Manipulations: at most this many fixed-point iterations per DDIM inversion step (0: the
    /// classic inversion).
    #[arg(long, default_value_t = 10, requires = "manipulation", conflicts_with_all = CAPTIONS)]
    inversion_iters: usize,
    /// Manipulations: a step's fixed-point iterations stop once no pixel of x moves by more.
    #[arg(long, default_value_t = 1e-4, requires = "manipulation", conflicts_with_all = CAPTIONS)]
    inversion_tolerance: f64,
    /// Output directory: one PNG per image (`NNN_KK.png`: caption NNN, draw KK), `grid.png`
    /// (a row per caption) and `samples.json`.
    #[arg(long, default_value = "runs/samples")]
    out: PathBuf,
    /// Seed of all sampling noise.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// How the noise is drawn from --seed: `stages` (each stage from the seed afresh, so runs
    /// with and without the prior decode from the same noise) or `diffusers` (one generator in
    /// diffusers' UnCLIPPipeline's order: with --diffusers, on the CPU in fp32, the images
    /// diffusers gives for generator=torch.Generator().manual_seed(SEED); all images in one batch).
    #[arg(
        long,
        default_value = "stages",
        value_name = "ORDER",
        conflicts_with = "manipulation"
    )]
    noise: NoiseOrder,
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
    /// The decoder's guidance scale (default: the decoder config's decoder.guidance_scale; for
    /// manipulations 1, unguided).
    #[arg(long)]
    decoder_guidance: Option<f64>,
    /// Keys of the decoder's sampler to change, as YAML: e.g. '{sampler: ddim, steps: "50"}' (the
    /// rest: the config's decoder.sampling; for manipulations '{sampler: ddim, steps: ddim50,
    /// clip: none}').
    #[arg(long, value_name = "YAML")]
    decoder_sampling: Option<String>,
    /// Images decoded at once.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// fp32, bf16, fp16 or auto (bf16 on CUDA and AMX CPUs, else fp32; for manipulations fp32).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Latent {
    Slerp,
    Fixed,
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

/// The manipulation the flags ask for, if any. A manipulation's option given with another
/// manipulation is an error naming both.
fn manipulation(cli: &Cli) -> Result<Option<Manipulation>> {
    let kind = [
        ("--variations", cli.variations.is_empty()),
        ("--interpolate", cli.interpolate.is_empty()),
        ("--text-diff", cli.text_diff.is_empty()),
        ("--pca-probe", cli.pca_probe.is_empty()),
    ]
    .into_iter()
    .find_map(|(flag, none)| (!none).then_some(flag));
    let Some(kind) = kind else {
        return Ok(None);
    };
    for (flag, given, owners) in [
        ("--eta", cli.eta.is_some(), "--variations"),
        ("--latent", cli.latent.is_some(), "--interpolate"),
        (
            "--frames",
            cli.frames.is_some(),
            "--interpolate or --text-diff",
        ),
        ("--from", !cli.from.is_empty(), "--text-diff"),
        ("--to", !cli.to.is_empty(), "--text-diff"),
        ("--max-theta", cli.max_theta.is_some(), "--text-diff"),
        (
            "--pca-embeddings",
            cli.pca_embeddings.is_some(),
            "--pca-probe",
        ),
        ("--pca-samples", cli.pca_samples.is_some(), "--pca-probe"),
        ("--components", !cli.components.is_empty(), "--pca-probe"),
    ] {
        anyhow::ensure!(
            !given || owners.contains(kind),
            "{flag} applies to {owners}, not {kind}"
        );
    }
    let frames = cli.frames.unwrap_or(8);
    Ok(Some(match kind {
        "--variations" => Manipulation::Variations {
            images: cli.variations.clone(),
            count: cli.count,
            eta: cli.eta.unwrap_or(1.0),
        },
        "--interpolate" => Manipulation::Interpolations {
            pairs: cli
                .interpolate
                .chunks(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect(),
            frames,
            latent: match cli.latent {
                Some(Latent::Fixed) => LatentPath::Fixed,
                Some(Latent::Slerp) | None => LatentPath::Slerp,
            },
        },
        "--text-diff" => Manipulation::TextDiffs {
            images: cli.text_diff.clone(),
            from: cli.from.clone(),
            to: cli.to.clone(),
            frames,
            max_theta: cli.max_theta.unwrap_or(0.5),
        },
        _ => Manipulation::PcaProbe {
            images: cli.pca_probe.clone(),
            embeddings: cli.pca_embeddings.clone().unwrap_or_default(),
            samples: cli.pca_samples.unwrap_or(10_000),
            components: cli.components.clone(),
        },
    }))
}

/// Runs a manipulation and writes its images, grid and `manipulations.json`.
fn manipulate(cli: &Cli, m: &Manipulation, pipeline: &Pipeline) -> Result<()> {
    let mut o = pipeline.manipulation_options();
    o.seed = cli.seed;
    o.batch_size = cli.batch_size;
    o.precision = parse_precision(&cli.precision)?;
    o.guidance = cli.decoder_guidance.unwrap_or(o.guidance);
    o.inversion = FixedPoint {
        max_iters: cli.inversion_iters,
        tolerance: cli.inversion_tolerance,
    };
    if let Some(yaml) = &cli.decoder_sampling {
        o.sampling = with_keys("--decoder-sampling", &o.sampling, yaml)?;
    }
    if let Some(yaml) = &cli.upsampler_sampling {
        o.upsampler_sampling = o
            .upsampler_sampling
            .iter()
            .map(|s| with_keys("--upsampler-sampling", s, yaml))
            .collect::<Result<_>>()?;
    }
    pipeline.check_manipulation(m, &o)?;
    println!(
        "decoder {}: {}, guidance {}, inversion with up to {} fixed-point iterations per step \
         (tolerance {}); {} px, device {:?}",
        pipeline.decoder.source,
        o.sampling.describe(),
        o.guidance,
        o.inversion.max_iters,
        o.inversion.tolerance,
        pipeline.resolution(),
        pipeline.device()
    );
    let rows = pipeline.manipulate(m, &o)?;
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let mut report = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let mut columns = Vec::new();
        for (k, column) in row.columns.iter().enumerate() {
            let path = image_path(&cli.out, i, k);
            let img = (row.images.get(k as i64).to_device(tch::Device::Cpu) + 1.0) * 0.5;
            unclip_train::logging::write_png(&path, &img.clamp(0.0, 1.0))?;
            let mut json = serde_json::to_value(column)?;
            json["file"] = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .into();
            columns.push(json);
        }
        let inputs: Vec<String> = row
            .columns
            .iter()
            .filter_map(|c| c.source.as_ref().map(|p| p.display().to_string()))
            .collect();
        let decoded: Vec<String> = row
            .columns
            .iter()
            .filter(|c| c.kind != "input")
            .map(|c| format!("{:.3}", c.clip_target.or(c.clip_image).unwrap_or(f64::NAN)))
            .collect();
        let rmse: Vec<String> = row
            .reconstruction_rmse
            .iter()
            .map(|r| format!("{r:.4}"))
            .collect();
        println!(
            "{}: reconstruction RMSE {}; cos(CLIP(image), {}) per decoded image: {}",
            inputs.join(" → "),
            if rmse.is_empty() {
                "-".into()
            } else {
                rmse.join(", ")
            },
            if row.captions.is_some() {
                "target z_t"
            } else {
                "its z"
            },
            decoded.join(" ")
        );
        report.push(serde_json::json!({
            "captions": row.captions.as_ref().map(|(from, to)| serde_json::json!({"from": from, "to": to})),
            "reconstruction_rmse": row.reconstruction_rmse,
            "columns": columns,
        }));
    }
    let images: Vec<Tensor> = rows.iter().map(|r| r.images.shallow_clone()).collect();
    let grid = unclip_decoder::task::tile_rows(&images)?;
    unclip_train::logging::write_png(&cli.out.join("grid.png"), &grid)?;
    let json = cli.out.join("manipulations.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!(
        "wrote {} rows, grid.png and manipulations.json to {}",
        rows.len(),
        cli.out.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let device = parse_device(&cli.device)?;
    let decoder = || {
        cli.decoder
            .as_deref()
            .context("--decoder RUN or --diffusers DIR")
    };
    let manipulation = manipulation(&cli)?;
    let pipeline = match (&cli.diffusers, &cli.clip) {
        (Some(dir), Some(clip)) => {
            let mut pipeline = Pipeline::from_diffusers(dir, clip, device)?;
            if manipulation.is_some() {
                pipeline.prior = None; // manipulations decode image embeddings
            }
            pipeline
        }
        _ => Pipeline::load(
            cli.prior.as_deref(),
            decoder()?,
            cli.decoder_checkpoint.as_deref(),
            device,
        )?
        .with_upsamplers(&cli.upsampler)?,
    };
    if let Some(m) = manipulation {
        return manipulate(&cli, &m, &pipeline);
    }
    let captions = captions(&cli)?;
    let precision = parse_precision(&cli.precision)?;
    let mut o = pipeline.default_options();
    o.count = cli.count;
    o.seed = cli.seed;
    o.noise = cli.noise;
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
        let last = run
            .last_step
            .as_ref()
            .map(|l| format!(", the last step on {}", l.source))
            .unwrap_or_default();
        println!(
            "upsampler {}: {} → {} px, {}{last}",
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
                "noise": format!("{:?}", o.noise).to_lowercase(),
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
