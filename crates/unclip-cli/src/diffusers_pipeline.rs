//! A diffusers `UnCLIPPipeline` directory (Karlo's, or one `export` wrote) as a [`Pipeline`]:
//! its prior, decoder with text projection, `super_res_first` and `super_res_last` (the last
//! super-resolution step's model, as diffusers runs it) read by the diffusers loaders,
//! each stage's process from its `UnCLIPScheduler` config, sampled as diffusers' pipeline samples
//! by default (ancestral steps 25 / 25 / 7, guidance 4 / 8, one prior draw) on CLIP embeddings as
//! they come (`clip_embeddings: raw`, what the pipeline feeds them). The caption encoder is a full
//! CLIP directory whose text tower must be the pipeline's `text_encoder/` (the images are scored
//! with its image tower, which a pipeline directory lacks, and which must be the `image_encoder/`
//! of an image-variation pipeline — Karlo's `karlo-v1-alpha-image-variations`, no prior — where
//! there is one).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Tensor};
use unclip_clip::caption::CaptionEncoder;
use unclip_data::embeddings::ClipEmbeddings;
use unclip_decoder::pretrained::read_json;
use unclip_decoder::task::DecoderTrainConfig;
use unclip_decoder::DecoderRun;
use unclip_prior::load::PriorRun;
use unclip_prior::task::PriorTrainConfig;
use unclip_prior::Prior;
use unclip_train::config::Validate;
use unclip_upsampler::run::LastStepModel;
use unclip_upsampler::task::UpsamplerTrainConfig;
use unclip_upsampler::{UpsamplerModelConfig, UpsamplerRun};

use crate::pipeline::Pipeline;

/// The training data a stage's config names: none, the weights come from the directory.
const UNUSED: &str = "(a diffusers pipeline directory)";

/// A stage's `diffusion:` and sampler `clip:` from its `UnCLIPScheduler` config (`name`: the
/// pipeline entry, for errors).
fn process(dir: &Path, name: &str) -> Result<(Value, Value)> {
    let path = dir.join(name).join("scheduler_config.json");
    // As a Value: an absent key reads as null (diffusers' default), not a panic.
    let s = Value::Object(read_json(&path)?);
    let class = s["_class_name"].as_str().unwrap_or("");
    ensure!(
        class == "UnCLIPScheduler",
        "{}: a {class} — this reads UnCLIPScheduler configs only",
        path.display()
    );
    let schedule = s["beta_schedule"].as_str().unwrap_or("squaredcos_cap_v2");
    ensure!(
        schedule == "squaredcos_cap_v2",
        "{}: beta_schedule {schedule}: UnCLIPScheduler's is squaredcos_cap_v2 (cosine)",
        path.display()
    );
    let predict = match s["prediction_type"].as_str().unwrap_or("epsilon") {
        "epsilon" => "epsilon",
        "sample" => "x0",
        other => bail!("{}: prediction_type {other}", path.display()),
    };
    let (variance, loss) = match s["variance_type"].as_str().unwrap_or("fixed_small_log") {
        "fixed_small_log" => ("fixed_small", "mse"),
        "learned_range" => ("learned_range", "hybrid"),
        other => bail!("{}: variance_type {other}", path.display()),
    };
    let timesteps = s["num_train_timesteps"].as_u64().unwrap_or(1000);
    let clip = if s["clip_sample"].as_bool().unwrap_or(true) {
        json!({"static": s["clip_sample_range"].as_f64().unwrap_or(1.0)})
    } else {
        json!("none")
    };
    Ok((
        json!({"schedule": "cosine", "timesteps": timesteps, "predict": predict,
               "variance": variance, "loss": loss}),
        clip,
    ))
}

/// The sampler diffusers' pipeline runs for `steps`: UnCLIPScheduler's ancestral steps are
/// evenly spaced from the last timestep to 0, which is this framework's respacing of `steps`.
fn sampler(steps: u32, clip: Value) -> Value {
    json!({"sampler": "ddpm", "steps": steps.to_string(), "clip": clip})
}

fn task_config<T: serde::de::DeserializeOwned + Validate>(value: Value, what: &str) -> Result<T> {
    let cfg: T = serde_json::from_value(value).with_context(|| format!("the {what}'s config"))?;
    cfg.validate()
        .with_context(|| format!("the {what}'s config"))?;
    Ok(cfg)
}

/// A CLIP tower a pipeline directory may hold: its part, what it is called in errors, and
/// whether every pipeline has one.
struct Tower {
    part: &'static str,
    name: &'static str,
    required: bool,
}

/// The text encoder every pipeline has, and an image-variation pipeline's image encoder.
const TOWERS: [Tower; 2] = [
    Tower {
        part: "text_encoder",
        name: "text tower",
        required: true,
    },
    Tower {
        part: "image_encoder",
        name: "image tower",
        required: false,
    },
];

/// Errors unless every weight of `dir/tower.part` equals the CLIP's tensor of that name (an
/// optional tower the directory lacks is skipped).
fn check_tower(dir: &Path, tower: &Tower, encoder: &CaptionEncoder, clip: &Path) -> Result<()> {
    let path = dir.join(tower.part).join("model.safetensors");
    if !tower.required && !path.is_file() {
        return Ok(());
    }
    let mut theirs =
        Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))?;
    // The file's order comes through a hash map: by name, the same tensor is named every time.
    theirs.sort_by(|a, b| a.0.cmp(&b.0));
    let ours = encoder.clip.vs.variables();
    for (name, t) in &theirs {
        let same = ours.get(name).is_some_and(|o| {
            o.size() == t.size()
                && (o.to_device(Device::Cpu) - t.to_kind(o.kind()))
                    .abs()
                    .max()
                    .double_value(&[])
                    <= 1e-6
        });
        ensure!(
            same,
            "--clip {}: its {} is not the pipeline's {} ({name} differs or is missing); give \
             the CLIP the pipeline was trained with",
            clip.display(),
            tower.name,
            tower.part
        );
    }
    Ok(())
}

/// Whether two files hold the same bytes (read in blocks: super-resolution weights are gigabytes).
fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let open =
        |p: &Path| std::fs::File::open(p).with_context(|| format!("reading {}", p.display()));
    let (fa, fb) = (open(a)?, open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ra, mut rb) = (std::io::BufReader::new(fa), std::io::BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = ra.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        rb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// `dir/super_res_last`, which diffusers' pipeline runs for the last super-resolution step, when
/// its weights differ from `super_res_first`'s (Karlo's do; `export` writes the same weights
/// twice, which need not be loaded twice). Its architecture must be `first`'s.
fn super_res_last(
    dir: &Path,
    first: &UpsamplerModelConfig,
    device: Device,
) -> Result<Option<LastStepModel>> {
    let last = dir.join("super_res_last");
    let weights = |d: &Path| d.join("diffusion_pytorch_model.safetensors");
    if !last.join("config.json").is_file()
        || files_equal(&weights(&dir.join("super_res_first")), &weights(&last))?
    {
        return Ok(None);
    }
    let mut loaded = unclip_upsampler::diffusers::load_diffusers_upsampler(&last, device)?;
    ensure!(
        &loaded.config == first,
        "{}: its config.json describes another UNet than super_res_first's; diffusers' pipeline \
         runs the two on the same inputs",
        last.display()
    );
    loaded.vs.freeze();
    Ok(Some(LastStepModel {
        vs: loaded.vs,
        model: loaded.model,
        source: format!("{} (super_res_last)", dir.display()),
    }))
}

/// The pipeline's `prior/` with its scheduler, sampled as diffusers' pipeline samples it.
fn prior(dir: &Path, clip: &Path, device: Device) -> Result<PriorRun> {
    let prior_dir = dir.join("prior");
    let (diffusion, clip_x0) = process(dir, "prior_scheduler")?;
    let prior_cfg: PriorTrainConfig = task_config(
        json!({
            "prior": {
                "model": unclip_prior::load::read_diffusers_prior_config(&prior_dir)?,
                "diffusion": diffusion,
                "sampling": sampler(25, clip_x0),
                "guidance_scale": 4.0,
                "candidates": 1,
                "clip_embeddings": "raw",
            },
            "clip": clip,
            "data": {"train": UNUSED, "held_out": UNUSED},
        }),
        "prior",
    )?;
    let loaded = unclip_prior::load::load_diffusers_prior(&prior_dir, device)
        .with_context(|| prior_dir.display().to_string())?;
    Ok(PriorRun {
        cfg: prior_cfg,
        vs: loaded.vs,
        model: Prior::Diffusion(loaded.model),
        source: format!("{} (prior)", dir.display()),
    })
}

impl Pipeline {
    /// The pipeline directory `dir` with the CLIP at `clip` (a Hugging Face or `train-clip`
    /// directory) as its caption encoder, on `device`.
    pub fn from_diffusers(dir: &Path, clip: &Path, device: Device) -> Result<Self> {
        ensure!(
            dir.join("model_index.json").is_file(),
            "{}: not a diffusers pipeline directory (no model_index.json)",
            dir.display()
        );
        let encoder = CaptionEncoder::load_with(clip, device, ClipEmbeddings::Raw)
            .with_context(|| format!("--clip {}", clip.display()))?;
        for tower in &TOWERS {
            check_tower(dir, tower, &encoder, clip)?;
        }
        let source = |part: &str| format!("{} ({part})", dir.display());
        let prior = if dir.join("prior").join("config.json").is_file() {
            Some(prior(dir, clip, device)?)
        } else {
            None // an image-variation pipeline's
        };

        let decoder_json = Value::Object(read_json(&dir.join("decoder").join("config.json"))?);
        let side = decoder_json["sample_size"].as_u64().unwrap_or(64);
        let (diffusion, clip_x0) = process(dir, "decoder_scheduler")?;
        let decoder_cfg: DecoderTrainConfig = task_config(
            json!({
                "decoder": {
                    "model": unclip_decoder::pretrained::read_diffusers_decoder_config(dir)?,
                    "diffusion": diffusion,
                    "sampling": sampler(25, clip_x0),
                    "guidance_scale": 8.0,
                    "clip_embeddings": "raw",
                },
                "clip": clip,
                "data": {"train": UNUSED, "held_out": UNUSED, "embeddings": "clip",
                         "image": {"resolution": side}},
            }),
            "decoder",
        )?;
        let mut loaded = unclip_decoder::pretrained::load_diffusers_decoder(dir, device)?;
        loaded.vs.freeze();
        let decoder = DecoderRun {
            cfg: decoder_cfg,
            vs: loaded.vs,
            model: loaded.model,
            source: source("decoder, text_proj"),
        };

        let mut upsamplers = Vec::new();
        let first = dir.join("super_res_first");
        if first.join("config.json").is_file() {
            let high = read_json(&first.join("config.json"))?
                .get("sample_size")
                .and_then(Value::as_u64)
                .context("super_res_first/config.json: no sample_size")?;
            let (diffusion, clip_x0) = process(dir, "super_res_scheduler")?;
            let cfg: UpsamplerTrainConfig = task_config(
                json!({
                    "upsampler": {
                        "model": unclip_upsampler::diffusers::read_diffusers_upsampler_config(&first)?,
                        "diffusion": diffusion,
                        "sampling": sampler(7, clip_x0),
                        "low_res": {"resolution": side},
                    },
                    "data": {"train": UNUSED, "held_out": UNUSED, "image": {"resolution": high}},
                }),
                "upsampler",
            )?;
            let mut loaded = unclip_upsampler::diffusers::load_diffusers_upsampler(&first, device)?;
            loaded.vs.freeze();
            let last_step = super_res_last(dir, &loaded.config, device)?;
            upsamplers.push(UpsamplerRun {
                cfg,
                vs: loaded.vs,
                model: loaded.model,
                source: source("super_res_first"),
                last_step,
            });
        }
        let name = format!("--clip {}", clip.display());
        Self::assemble(encoder, &name, prior, decoder, upsamplers, device)
    }
}
