//! Held-out evaluation of a trained prior, or of the whole text-to-image pipeline, over a grid
//! of guidance scales; a JSON report.
//!
//!     evaluate --prior runs/prior --data 'data/shapes/clipval64-{000000..000001}.tar'
//!     evaluate --prior runs/prior --decoder runs/decoder --data 'data/shapes/clipval64-000000.tar' \
//!         --limit 64 --decoder-guidance 1,3
//!     evaluate --diffusers karlo-v1-alpha --clip clip-vit-large-patch14 --data 'val-{000000..000003}.tar'

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::{ArgGroup, Parser};
use serde_json::{json, Value};
use unclip_cli::evaluate::{
    encode_captions, real_scores, score_pipeline, Conditioning, HeldOutImages, ImageRow,
};
use unclip_cli::pipeline::{parse_precision, Pipeline, PipelineOptions};
use unclip_clip::caption::CaptionEncoder;
use unclip_diffusion::device::parse_device;
use unclip_prior::load::{load_prior_run, PriorRun};
use unclip_prior::prior::describe_sampling;
use unclip_prior::task::{EvalReport, EvalSettings, HeldOut};
use unclip_prior::PriorSampling;
use unclip_train::precision::{autocast, resolve, Precision};

#[derive(Parser)]
#[command(
    about = "Score a trained prior, or the text-to-image pipeline, on held-out captioned images",
    long_about = "Score a trained prior, or the text-to-image pipeline, on held-out captioned \
        images (WebDataset shards of image + caption, as make-shapes or img2dataset write them).\n\n\
        With --prior alone: the prior's samples for the held-out captions against the real images' \
        CLIP embeddings (cos(sample, z_i), cos(sample, z_t), the z_t baseline), per prior guidance \
        scale.\n\nWith --decoder (and --prior; --no-prior for z_t decoded; --true-image-embeddings \
        for the real images' z_i decoded, the decoder's ceiling): --count images per \
        caption for every pair of prior and decoder guidance scales, scored by CLIP score \
        (cos(CLIP(image), z_t)), CLIP's top-1 caption retrieval among the held-out captions, \
        cos(CLIP(image), the z_i decoded), FD_CLIP (Fréchet distance of the images' CLIP \
        embeddings to the real images') and, on shapes scenes, the shapes drawn right; the real \
        images' scores beside them. --diffusers DIR --clip CLIP instead of runs: a diffusers \
        UnCLIPPipeline directory (Karlo's) as sample --diffusers samples it. Writes \
        OUT/report.json."
)]
#[command(group(ArgGroup::new("images").args(["decoder", "diffusers"])))]
struct Cli {
    /// Held-out shards of captioned images, e.g. 'data/shapes/clipval64-{000000..000001}.tar'.
    #[arg(long, value_name = "SHARDS")]
    data: String,
    /// Samples read from --data (the first ones, in order).
    #[arg(long, default_value_t = 256)]
    limit: usize,
    /// A train-prior run directory (newest checkpoint, EMA weights).
    #[arg(long, value_name = "RUN", required_unless_present_any = ["decoder", "diffusers"])]
    prior: Option<PathBuf>,
    /// Decode z_t itself instead of a prior's sample: the paper's zero-shot baseline.
    #[arg(long, conflicts_with = "prior", requires = "images")]
    no_prior: bool,
    /// Decode the real images' CLIP embeddings z_i instead of a prior's sample: the decoder's
    /// ceiling (how well it inverts CLIP), beside which the prior's rows show what it loses.
    #[arg(long, conflicts_with_all = ["prior", "no_prior"], requires = "images")]
    true_image_embeddings: bool,
    /// A train-decoder run directory (newest checkpoint, EMA weights): score images, not only
    /// the prior's embeddings.
    #[arg(long, value_name = "RUN")]
    decoder: Option<PathBuf>,
    /// This checkpoint of the decoder run (`RUN/checkpoints/step-N`) instead of its newest.
    #[arg(long, value_name = "DIR", requires = "decoder")]
    decoder_checkpoint: Option<PathBuf>,
    /// A train-upsampler run directory after the decoder; repeat for the second stage.
    #[arg(long, value_name = "RUN", requires = "decoder")]
    upsampler: Vec<PathBuf>,
    /// Instead of runs: a diffusers UnCLIPPipeline directory (Karlo's, or one `export` wrote) —
    /// its prior (none with --no-prior or --true-image-embeddings), decoder and super-resolution,
    /// sampled as `sample --diffusers` samples it; needs --clip.
    #[arg(
        long,
        value_name = "DIR",
        requires = "clip",
        conflicts_with_all = ["prior", "decoder", "decoder_checkpoint", "upsampler"]
    )]
    diffusers: Option<PathBuf>,
    /// With --diffusers: the CLIP whose text tower is the pipeline's text_encoder; it encodes the
    /// captions and embeds the held-out and generated images.
    #[arg(long, value_name = "DIR", requires = "diffusers")]
    clip: Option<PathBuf>,
    /// Prior guidance scales to score, comma-separated (default: the config's
    /// prior.guidance_scale).
    #[arg(long, value_delimiter = ',', value_name = "G,…")]
    prior_guidance: Vec<f64>,
    /// Decoder guidance scales to score, comma-separated (default: the config's
    /// decoder.guidance_scale).
    #[arg(long, value_delimiter = ',', value_name = "G,…", requires = "images")]
    decoder_guidance: Vec<f64>,
    /// Prior draws per image, reranked by z_i · z_t (default: the config's prior.candidates).
    #[arg(long)]
    candidates: Option<usize>,
    /// Keys of the prior's sampling to change, as YAML (as `sample --prior-sampling`).
    #[arg(long, value_name = "YAML")]
    prior_sampling: Option<String>,
    /// Keys of the decoder's sampler to change, as YAML (as `sample --decoder-sampling`).
    #[arg(long, value_name = "YAML", requires = "images")]
    decoder_sampling: Option<String>,
    /// Keys of every upsampler's sampler to change, as YAML.
    #[arg(long, value_name = "YAML", requires = "images")]
    upsampler_sampling: Option<String>,
    /// Images per caption.
    #[arg(long, default_value_t = 1, requires = "images")]
    count: usize,
    /// Seed of all sampling noise; every guidance setting starts from the same noise.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Images decoded (and CLIP-embedded) at once.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// fp32, bf16, fp16 or auto (bf16 on CUDA and AMX CPUs, else fp32).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output directory: report.json (and images/ with --save-images).
    #[arg(long, default_value = "runs/eval")]
    out: PathBuf,
    /// Also write every image: OUT/images/<setting>/NNN_KK.png (held-out sample NNN, draw KK).
    #[arg(long, requires = "images")]
    save_images: bool,
}

fn prior_json(run: &PriorRun, dir: &str, sampling: &PriorSampling, candidates: usize) -> Value {
    json!({
        "run": dir,
        "weights": run.source,
        "kind": run.cfg.prior.model_key(),
        "sampling": describe_sampling(sampling),
        "candidates": candidates,
    })
}

fn prior_eval_json(r: &EvalReport) -> Value {
    json!({
        "baseline_cos_zt_zi": r.baseline,
        "codec_round_trip": r.codec_round_trip,
        "rows": r.rows.iter().map(|row| json!({
            "guidance": row.guidance_scale,
            "cos_sample_zi": row.cos_true,
            "cos_sample_zt": row.cos_text,
            "manifold": row.manifold,
        })).collect::<Vec<_>>(),
    })
}

/// The prior's samples for the held-out captions scored at each guidance scale (under
/// `precision`'s autocast).
fn evaluate_prior(
    run: &PriorRun,
    encoder: &CaptionEncoder,
    held: &HeldOutImages,
    settings: &EvalSettings,
    precision: Precision,
) -> Result<EvalReport> {
    let _g = tch::no_grad_guard();
    let device = held.image_embeds.device();
    let _autocast = autocast(device, resolve(precision, device).precision);
    let held_out = HeldOut {
        text: encode_captions(encoder, &held.captions)?,
        image_embeds: held.image_embeds.shallow_clone(),
    };
    run.model.evaluate(
        &run.cfg.prior,
        settings,
        &held_out,
        &encoder.null_condition()?,
    )
}

fn image_row_line(r: &ImageRow) -> String {
    let prior = match (r.conditioning, r.prior_guidance) {
        (_, Some(g)) => format!("prior guidance {g}"),
        (Conditioning::TrueImageEmbedding, None) => "true z_i".to_string(),
        _ => "z_t, no prior".to_string(),
    };
    let shapes = r.shapes.map_or(String::new(), |s| format!("; {s}"));
    let manifold = r.manifold.map_or(String::new(), |m| {
        format!(
            ", precision {:.3}, recall {:.3}, density {:.3}, coverage {:.3}",
            m.precision, m.recall, m.density, m.coverage
        )
    });
    format!(
        "{prior}, decoder guidance {}: CLIP score {:.4}, caption top-1 {:.1} %, cos(CLIP(image), z_i) {:.4}, FD_CLIP {:.4}{manifold}{shapes}",
        r.decoder_guidance,
        r.clip_score,
        100.0 * r.clip_top1,
        r.clip_image_score,
        r.fd_clip
    )
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.limit >= 1, "--limit must be at least 1");
    ensure!(cli.batch_size >= 1, "--batch-size must be at least 1");
    ensure!(
        cli.decoder.is_none() || cli.prior.is_some() || cli.no_prior || cli.true_image_embeddings,
        "--decoder needs --prior RUN, --no-prior to decode z_t or --true-image-embeddings to \
         decode the real images' z_i"
    );
    let device = parse_device(&cli.device)?;
    let precision = parse_precision(&cli.precision)?;
    let mut report = serde_json::Map::new();
    report.insert("data".into(), json!(cli.data));
    report.insert("seed".into(), json!(cli.seed));

    if let (Some(dir), Some(clip)) = (&cli.diffusers, &cli.clip) {
        let mut pipeline = Pipeline::from_diffusers(dir, clip, device)?;
        if cli.no_prior || cli.true_image_embeddings {
            pipeline.prior = None;
        }
        return evaluate_images(&cli, &pipeline, precision, report);
    }
    let Some(decoder_dir) = &cli.decoder else {
        // The prior alone.
        let dir = cli.prior.as_ref().context("--prior RUN or --decoder RUN")?;
        let run = load_prior_run(dir, None, device)
            .with_context(|| format!("prior run {}", dir.display()))?;
        let clip = &run.cfg.clip;
        let name = format!("{} (the clip: of {})", clip.display(), dir.display());
        let encoder = CaptionEncoder::load_with(clip, device, run.cfg.prior.clip_embeddings)
            .with_context(|| format!("clip {name}"))?;
        unclip_prior::task::check_clip_fits(&encoder, &run.cfg.prior, &name)?;
        let p = &run.cfg.prior;
        let mut sampling = run.model.sampling(p);
        if let Some(yaml) = &cli.prior_sampling {
            sampling = sampling.with_keys("--prior-sampling", yaml)?;
        }
        let settings = EvalSettings {
            sampling,
            guidance_scales: guidance_or(
                &cli.prior_guidance,
                p.guidance_scale,
                "--prior-guidance",
            )?,
            candidates: cli.candidates.unwrap_or(p.candidates),
            seed: cli.seed,
        };
        ensure!(settings.candidates >= 1, "--candidates must be at least 1");
        let held = HeldOutImages::read(&cli.data, cli.limit, &encoder.clip, cli.batch_size)?;
        println!(
            "{} held-out samples of {} ({} skipped); prior {}: {}, {} candidates",
            held.len(),
            cli.data,
            held.skipped,
            run.source,
            describe_sampling(&settings.sampling),
            settings.candidates
        );
        let r = evaluate_prior(&run, &encoder, &held, &settings, precision)?;
        println!("{}", r.summary());
        report.insert("samples".into(), json!(held.len()));
        report.insert("skipped".into(), json!(held.skipped));
        report.insert(
            "prior".into(),
            prior_json(
                &run,
                &dir.display().to_string(),
                &settings.sampling,
                settings.candidates,
            ),
        );
        report.insert("prior_eval".into(), prior_eval_json(&r));
        return write_report(&cli.out, report);
    };

    let pipeline = Pipeline::load(
        cli.prior.as_deref(),
        decoder_dir,
        cli.decoder_checkpoint.as_deref(),
        device,
    )?
    .with_upsamplers(&cli.upsampler)?;
    evaluate_images(&cli, &pipeline, precision, report)
}

/// The pipeline's images for the held-out captions, scored for every pair of guidance scales.
fn evaluate_images(
    cli: &Cli,
    pipeline: &Pipeline,
    precision: Precision,
    mut report: serde_json::Map<String, Value>,
) -> Result<()> {
    // Where each stage comes from, for the report: its run, or the pipeline directory.
    let source = |run: Option<&Path>| {
        run.or(cli.diffusers.as_deref())
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let mut o = pipeline.default_options();
    o.count = cli.count;
    o.seed = cli.seed;
    o.batch_size = cli.batch_size;
    o.precision = precision;
    o.candidates = cli.candidates.unwrap_or(o.candidates);
    o.override_sampling(
        cli.prior_sampling.as_deref(),
        cli.decoder_sampling.as_deref(),
        cli.upsampler_sampling.as_deref(),
    )?;
    let prior_scales = match &pipeline.prior {
        Some(_) => guidance_or(&cli.prior_guidance, o.prior_guidance, "--prior-guidance")?,
        None => {
            ensure!(
                cli.prior_guidance.is_empty(),
                "--prior-guidance without a prior"
            );
            vec![o.prior_guidance]
        }
    };
    let decoder_scales = guidance_or(
        &cli.decoder_guidance,
        o.decoder_guidance,
        "--decoder-guidance",
    )?;
    // Every setting is checked before any work.
    if cli.true_image_embeddings {
        pipeline.expects_image_embeddings("--true-image-embeddings")?;
    }
    for (&pg, &dg) in prior_scales
        .iter()
        .flat_map(|p| decoder_scales.iter().map(move |d| (p, d)))
    {
        pipeline.check(&PipelineOptions {
            prior_guidance: pg,
            decoder_guidance: dg,
            ..o.clone()
        })?;
    }
    let held = HeldOutImages::read(&cli.data, cli.limit, &pipeline.encoder.clip, cli.batch_size)?;
    ensure!(
        held.len() >= 2,
        "--data {}: FD_CLIP needs at least 2 held-out samples, {} read (--limit {})",
        cli.data,
        held.len(),
        cli.limit
    );
    println!(
        "{} held-out samples of {} ({} skipped), {} images each at {} px; decoder {}: {}",
        held.len(),
        cli.data,
        held.skipped,
        o.count,
        pipeline.resolution(),
        pipeline.decoder.source,
        o.decoder_sampling.describe()
    );
    let real = real_scores(&held, &pipeline.encoder)?;
    let shapes = real.shapes.map_or(String::new(), |s| format!("; {s}"));
    println!(
        "real images: CLIP score {:.4}, caption top-1 {:.1} %{shapes}",
        real.clip_score,
        100.0 * real.clip_top1
    );
    report.insert("samples".into(), json!(held.len()));
    report.insert("skipped".into(), json!(held.skipped));
    report.insert("count".into(), json!(o.count));
    report.insert("resolution".into(), json!(pipeline.resolution()));
    report.insert(
        "decoder".into(),
        json!({
            "run": source(cli.decoder.as_deref()),
            "weights": pipeline.decoder.source,
            "embedding": pipeline.decoder.cfg.decoder.embedding,
            "sampling": o.decoder_sampling.describe(),
        }),
    );
    report.insert(
        "upsamplers".into(),
        json!(pipeline
            .upsamplers
            .iter()
            .zip(&o.upsampler_sampling)
            .enumerate()
            .map(|(k, (u, s))| json!({
                "run": source(cli.upsampler.get(k).map(PathBuf::as_path)),
                "weights": u.source,
                "sampling": s.describe(),
            }))
            .collect::<Vec<_>>()),
    );
    report.insert("real".into(), serde_json::to_value(&real)?);
    if let Some(run) = &pipeline.prior {
        let dir = source(cli.prior.as_deref());
        let settings = EvalSettings {
            sampling: o.prior_sampling.clone(),
            guidance_scales: prior_scales.clone(),
            candidates: o.candidates,
            seed: cli.seed,
        };
        let r = evaluate_prior(run, &pipeline.encoder, &held, &settings, precision)?;
        println!("prior {}: {}", run.source, r.summary());
        report.insert(
            "prior".into(),
            prior_json(run, &dir, &o.prior_sampling, o.candidates),
        );
        report.insert("prior_eval".into(), prior_eval_json(&r));
    }
    let captions_at_once = (cli.batch_size / cli.count).max(1);
    let mut rows = Vec::new();
    for &pg in &prior_scales {
        for &dg in &decoder_scales {
            let setting = PipelineOptions {
                prior_guidance: pg,
                decoder_guidance: dg,
                ..o.clone()
            };
            let save = cli.save_images.then(|| {
                let name = match &pipeline.prior {
                    Some(_) => format!("prior-g{pg}_decoder-g{dg}"),
                    None if cli.true_image_embeddings => format!("true-z_i_decoder-g{dg}"),
                    None => format!("no-prior_decoder-g{dg}"),
                };
                cli.out.join("images").join(name)
            });
            let row = score_pipeline(
                pipeline,
                &held,
                &setting,
                cli.true_image_embeddings,
                captions_at_once,
                save.as_deref(),
            )?;
            println!("{}", image_row_line(&row));
            rows.push(serde_json::to_value(&row)?);
        }
    }
    report.insert("images".into(), Value::Array(rows));
    write_report(&cli.out, report)
}

/// `given`, or `[default]` when empty; each must be finite and ≥ 0.
fn guidance_or(given: &[f64], default: f64, flag: &str) -> Result<Vec<f64>> {
    let scales = if given.is_empty() {
        vec![default]
    } else {
        given.to_vec()
    };
    for &g in &scales {
        ensure!(
            g.is_finite() && g >= 0.0,
            "{flag}: {g} is not a finite scale >= 0"
        );
    }
    Ok(scales)
}

fn write_report(out: &Path, report: serde_json::Map<String, Value>) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&Value::Object(report))?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
