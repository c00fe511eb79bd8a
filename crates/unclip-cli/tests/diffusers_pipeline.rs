//! `sample --diffusers` against diffusers' own UnCLIPPipeline: a tiny random pipeline directory
//! (Karlo's layout, with a super_res_last that differs from super_res_first) and what diffusers
//! generated with it, from `scripts/fixtures/unclip_pipeline.py`. With `--noise diffusers` the
//! same captions and seed must give the same prior samples, decoder images and final images.
//! Manipulations and `evaluate` take the directory too.

mod common;

use std::path::{Path, PathBuf};

use common::{read_tensors, run_fails};
use tch::{Device, Kind, Tensor};
use unclip_cli::pipeline::{NoiseOrder, Pipeline, PipelineOptions};
use unclip_testkit::max_abs_diff;
use unclip_train::precision::Precision;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unclip_pipeline")
}

/// How diffusers ran.
struct Run {
    captions: Vec<String>,
    seed: i64,
    prior_guidance: f64,
    decoder_guidance: f64,
}

fn run_json() -> Run {
    let text = std::fs::read_to_string(fixture().join("run.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    Run {
        captions: v["captions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect(),
        seed: v["seed"].as_i64().unwrap(),
        prior_guidance: v["prior_guidance"].as_f64().unwrap(),
        decoder_guidance: v["decoder_guidance"].as_f64().unwrap(),
    }
}

/// The fixture's pipeline directory copied into `dir`, with the `text_encoder/` the fixture
/// leaves out (its weights are the CLIP's text tower: the CLIP's tensors of those names).
fn pipeline_dir(dir: &Path) -> PathBuf {
    let out = dir.join("pipeline");
    let src = fixture().join("pipeline");
    for entry in walk(&src) {
        let target = out.join(entry.strip_prefix(&src).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
    write_tower(
        &out.join("text_encoder"),
        &["text_model.", "text_projection."],
    );
    out
}

/// The CLIP's tensors whose names start with one of `prefixes`, as `dir/model.safetensors`.
fn write_tower(dir: &Path, prefixes: &[&str]) {
    let clip = read_tensors(&fixture().join("clip/model.safetensors"));
    let tower: Vec<(String, Tensor)> = clip
        .into_iter()
        .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p)))
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    Tensor::write_safetensors(&tower, dir.join("model.safetensors")).unwrap();
}

/// `--diffusers DIR --clip (the fixture's CLIP) --device cpu --out OUT` and `extra`: the
/// arguments `sample` and `evaluate` get here.
fn pipeline_args(dir: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let clip = fixture().join("clip");
    let mut args: Vec<String> = ["--diffusers", path(dir), "--clip", path(&clip)]
        .into_iter()
        .chain(["--device", "cpu", "--out", path(out)])
        .map(String::from)
        .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn options(pipeline: &Pipeline, run: &Run) -> PipelineOptions {
    let mut o = pipeline.default_options();
    o.count = 1;
    o.seed = run.seed;
    o.prior_guidance = run.prior_guidance;
    o.decoder_guidance = run.decoder_guidance;
    o.noise = NoiseOrder::Diffusers;
    o.precision = Precision::Fp32;
    o
}

#[test]
fn generates_what_diffusers_pipeline_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pipeline_dir(tmp.path());
    let run = run_json();
    let captions = &run.captions;
    let want = read_tensors(&fixture().join("expected.safetensors"));
    let mut pipeline =
        Pipeline::from_diffusers(&dir, &fixture().join("clip"), Device::Cpu).unwrap();
    assert!(
        pipeline.upsamplers[0].last_step.is_some(),
        "the fixture's super_res_last differs from super_res_first"
    );
    let o = options(&pipeline, &run);

    let g = pipeline.generate(captions, &o).unwrap();
    let embeds = max_abs_diff(&g.image_embeds, &want["image_embeds"]);
    let images = max_abs_diff(&g.images, &want["images"]);
    assert!(
        embeds < 1e-5,
        "prior samples differ from diffusers' by {embeds}"
    );
    assert!(images < 5e-4, "images differ from diffusers' by {images}");
    // The images vary, so agreement is not two constant outputs agreeing.
    assert!(want["images"].std(false).double_value(&[]) > 0.1);

    // Two images per caption (diffusers' num_images_per_prompt), from the next seed.
    let pair = pipeline
        .generate(
            &captions[..1],
            &PipelineOptions {
                count: 2,
                seed: run.seed + 1,
                ..o.clone()
            },
        )
        .unwrap();
    let pair = max_abs_diff(&pair.images, &want["first_caption_twice"]);
    assert!(
        pair < 5e-4,
        "two images per caption differ from diffusers' by {pair}"
    );

    // Each stage alone, and what the noise order and super_res_last change.
    let last = pipeline.upsamplers[0].last_step.take();
    let without_last = pipeline.generate(captions, &o).unwrap();
    let gap = max_abs_diff(&without_last.images, &want["images"]);
    assert!(
        gap > 1e-2,
        "super_res_last left the images unchanged ({gap})"
    );
    pipeline.upsamplers[0].last_step = last;
    let stages = pipeline
        .generate(
            captions,
            &PipelineOptions {
                noise: NoiseOrder::Stages,
                ..o.clone()
            },
        )
        .unwrap();
    assert!(max_abs_diff(&stages.images, &want["images"]) > 1e-2);
    let upsamplers = std::mem::take(&mut pipeline.upsamplers);
    let decoder_only = PipelineOptions {
        upsampler_sampling: Vec::new(),
        ..o.clone()
    };
    let decoded = pipeline.generate(captions, &decoder_only).unwrap();
    let decoder = max_abs_diff(&decoded.images, &want["decoder"]);
    assert!(
        decoder < 2e-4,
        "decoder images differ from diffusers' by {decoder}"
    );
    pipeline.upsamplers = upsamplers;

    // Not diffusers' draws: images in two batches, or several prior candidates.
    for o in [
        PipelineOptions {
            batch_size: 1,
            ..o.clone()
        },
        PipelineOptions {
            candidates: 2,
            ..o.clone()
        },
    ] {
        let err = format!("{:#}", pipeline.generate(captions, &o).err().unwrap());
        assert!(err.contains("--noise diffusers"), "{err}");
    }
}

#[test]
fn sample_binary_writes_diffusers_images() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pipeline_dir(tmp.path());
    let run = run_json();
    let captions = &run.captions;
    let out = tmp.path().join("out");
    let seed = run.seed.to_string();
    let (prior_guidance, decoder_guidance) = (
        run.prior_guidance.to_string(),
        run.decoder_guidance.to_string(),
    );
    let mut extra = vec![
        "--count",
        "1",
        "--seed",
        &seed,
        "--noise",
        "diffusers",
        "--prior-guidance",
        &prior_guidance,
        "--decoder-guidance",
        &decoder_guidance,
        "--precision",
        "fp32",
    ];
    for c in captions {
        extra.extend(["--caption", c]);
    }
    let args = pipeline_args(&dir, &out, &extra);
    let args = strs(&args);
    let stdout = common::run(env!("CARGO_BIN_EXE_sample"), &args);
    assert!(stdout.contains("super_res_last"), "{stdout}");
    let want = read_tensors(&fixture().join("expected.safetensors"))["images"].shallow_clone();
    for i in 0..captions.len() {
        let png = image::open(out.join(format!("{i:03}_00.png")))
            .unwrap()
            .to_rgb8();
        let got = Tensor::from_slice(png.as_raw())
            .view([32, 32, 3])
            .permute([2, 0, 1])
            .to_kind(Kind::Float);
        let expected = ((want.get(i as i64) + 1.0) * 127.5).clamp(0.0, 255.0);
        // 8-bit rounding (or truncation) of the same image.
        let diff = max_abs_diff(&got, &expected);
        assert!(
            diff <= 1.0 + 1e-3,
            "caption {i}: {diff} levels from diffusers'"
        );
    }
    let err = run_fails(
        env!("CARGO_BIN_EXE_sample"),
        &[&args[..], &["--batch-size", "1"]].concat(),
    );
    assert!(err.contains("--batch-size"), "{err}");
}

#[test]
fn manipulates_images_with_a_pipeline_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pipeline_dir(tmp.path());
    // A 16-px input: a red disc on grey.
    let input = tmp.path().join("disc.png");
    image::RgbImage::from_fn(16, 16, |x, y| {
        let (dx, dy) = (x as f32 - 7.5, y as f32 - 7.5);
        if dx * dx + dy * dy < 25.0 {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([128, 128, 128])
        }
    })
    .save(&input)
    .unwrap();
    let out = tmp.path().join("variations");
    let args = pipeline_args(
        &dir,
        &out,
        &[
            "--variations",
            path(&input),
            "--count",
            "2",
            "--decoder-sampling",
            "{steps: ddim10}",
        ],
    );
    let stdout = common::run(env!("CARGO_BIN_EXE_sample"), &strs(&args));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manipulations.json")).unwrap())
            .unwrap();
    assert_eq!(report.as_array().unwrap().len(), 1, "{stdout}");
    assert!(report[0]["reconstruction_rmse"][0]
        .as_f64()
        .unwrap()
        .is_finite());
    // Input, reconstruction, two variations: decoded at 16 px, then through the pipeline's
    // super-resolution to 32.
    let kinds: Vec<&str> = report[0]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["input", "reconstruction", "variation", "variation"]);
    let draws: Vec<image::RgbImage> = (1..4)
        .map(|k| {
            let png = image::open(out.join(format!("000_{k:02}.png"))).unwrap();
            png.to_rgb8()
        })
        .collect();
    for d in &draws {
        assert_eq!(d.dimensions(), (32, 32));
    }
    assert_ne!(
        draws[1], draws[2],
        "two variations (η = 1) came out the same"
    );
}

#[test]
fn evaluates_a_pipeline_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pipeline_dir(tmp.path());
    let shards = unclip_data::shards::write_shapes_shards(&unclip_data::shards::ShapesSpec {
        count: 4,
        resolution: 32,
        seed: 3,
        shard_size: 4,
        out: tmp.path().join("shapes"),
        prefix: "val".into(),
    })
    .unwrap();
    let evaluate = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let args = pipeline_args(&dir, &out, &[&["--data", path(&shards[0])], extra].concat());
        let stdout = common::run(env!("CARGO_BIN_EXE_evaluate"), &strs(&args));
        let text = std::fs::read_to_string(out.join("report.json")).unwrap();
        (
            stdout,
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        )
    };
    let (stdout, report) = evaluate("eval", &["--prior-guidance", "1,4"]);
    assert_eq!(report["samples"], 4, "{stdout}");
    assert_eq!(report["resolution"], 32, "{stdout}");
    let rows = report["images"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{stdout}");
    for (row, guidance) in rows.iter().zip([1.0, 4.0]) {
        assert_eq!(row["conditioning"], "prior");
        assert_eq!(row["prior_guidance"], guidance);
        for key in ["clip_score", "clip_image_score", "fd_clip"] {
            assert!(row[key].as_f64().unwrap().is_finite(), "{key}: {row}");
        }
    }
    // The pipeline's own prior, scored on its embeddings too, and its super-resolution stage.
    assert_eq!(report["prior_eval"]["rows"].as_array().unwrap().len(), 2);
    assert_eq!(report["prior"]["run"], dir.display().to_string());
    assert_eq!(report["upsamplers"].as_array().unwrap().len(), 1);
    // Decoding z_t instead: no prior rows.
    let (stdout, report) = evaluate("eval-zt", &["--no-prior"]);
    assert!(report.get("prior_eval").is_none(), "{stdout}");
    assert_eq!(report["images"][0]["conditioning"], "text_embedding");
    assert_eq!(
        report["images"][0]["prior_guidance"],
        serde_json::Value::Null
    );
}

#[test]
fn takes_an_image_variation_pipeline_directory() {
    // Karlo's image-variation layout: no prior, the CLIP's image tower as `image_encoder/`.
    let tmp = tempfile::tempdir().unwrap();
    let dir = pipeline_dir(tmp.path());
    for part in ["prior", "prior_scheduler"] {
        std::fs::remove_dir_all(dir.join(part)).unwrap();
    }
    write_tower(
        &dir.join("image_encoder"),
        &["vision_model.", "visual_projection."],
    );
    let input = tmp.path().join("input.png");
    image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 16) as u8, (y * 16) as u8, 90])
    })
    .save(&input)
    .unwrap();
    let variations = tmp.path().join("variations");
    let args = pipeline_args(
        &dir,
        &variations,
        &["--variations", path(&input), "--count", "1"],
    );
    common::run(env!("CARGO_BIN_EXE_sample"), &strs(&args));
    assert!(variations.join("000_02.png").is_file());
    // Captions without a prior: the decoder is given z_t.
    let captions = tmp.path().join("captions");
    let args = pipeline_args(
        &dir,
        &captions,
        &["--caption", "a red circle", "--count", "1"],
    );
    let args = strs(&args);
    let stdout = common::run(env!("CARGO_BIN_EXE_sample"), &args);
    assert!(stdout.contains("no prior"), "{stdout}");
    // Another image tower is refused, naming the part.
    let path = dir.join("image_encoder/model.safetensors");
    let tensors: Vec<(String, Tensor)> = read_tensors(&path)
        .into_iter()
        .map(|(name, t)| {
            let t = if name == "visual_projection.weight" {
                t + 1.0
            } else {
                t
            };
            (name, t)
        })
        .collect();
    Tensor::write_safetensors(&tensors, &path).unwrap();
    let err = run_fails(env!("CARGO_BIN_EXE_sample"), &args);
    assert!(
        err.contains("image_encoder") && err.contains("visual_projection.weight"),
        "{err}"
    );
}
