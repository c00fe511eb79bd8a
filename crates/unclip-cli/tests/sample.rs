//! Text to image through the binaries: shapes shards → `embed --token-features` (a random tiny
//! CLIP) → `train-prior`, `train-decoder` and `train-upsampler` → `sample`: the files it writes,
//! that the same seed repeats, that the caption, the prior and the guidance reach the decoder and
//! the decoder's images the upsampler, and the errors for runs that do not fit together; and
//! `evaluate` on the same runs: its figures recomputed from the shards and the images it saves;
//! `export` of them: each diffusers component read back equal, the refusals; and the image
//! manipulations with the decoder (`manipulations`).
use std::path::{Path, PathBuf};
mod common;
#[path = "sample/manipulations.rs"]
mod manipulations;
use common::{
    decoder_config, embedded_shapes, prior_config, prior_config_with, run, run_fails,
    AUTOREGRESSIVE_PRIOR,
};
use unclip_cli::pipeline::Pipeline;
use unclip_data::shards::{write_shapes_shards, ShapesSpec};
use unclip_prior::{ArSampling, PriorSampling};

/// A tiny CLIP, its embedded shapes, a prior of each kind and a decoder trained a few steps on
/// them, and a 32 → 64 px upsampler trained a few steps on 64-px shapes.
struct Runs {
    tmp: tempfile::TempDir,
}

impl Runs {
    fn train() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        embedded_shapes(dir, 32, env!("CARGO_BIN_EXE_embed"));
        for (bin, name, config) in [
            (
                env!("CARGO_BIN_EXE_train-prior"),
                "prior",
                prior_config(dir),
            ),
            (
                env!("CARGO_BIN_EXE_train-prior"),
                "prior-ar",
                prior_config_with(dir, AUTOREGRESSIVE_PRIOR),
            ),
            (
                env!("CARGO_BIN_EXE_train-decoder"),
                "decoder",
                decoder_config(dir),
            ),
        ] {
            let file = dir.join(format!("{name}.yaml"));
            std::fs::write(&file, config).unwrap();
            let run_dir = dir.join(name);
            let mut args = vec![
                "--config".to_string(),
                file.display().to_string(),
                "--run-dir".into(),
                run_dir.display().to_string(),
            ];
            // The configs' steps (prior 6, decoder 40); no grids while the decoder trains.
            if name == "decoder" {
                args.extend(["--set".into(), "logging.images_every=1000".into()]);
            }
            run(bin, &args.iter().map(String::as_str).collect::<Vec<_>>());
        }
        write_shapes_shards(&ShapesSpec {
            count: 16,
            resolution: 64,
            seed: 5,
            shard_size: 16,
            out: dir.join("shapes"),
            prefix: "hi".into(),
        })
        .unwrap();
        let config = dir.join("upsampler.yaml");
        std::fs::write(
            &config,
            format!(
                "
device: cpu
upsampler:
  model: {{block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 4}}
  sampling: {{sampler: ddim, steps: ddim3, clip: {{static: 1.0}}}}
  low_res: {{resolution: 32, blur: {{kernel: 3, sigma: 0.6}}}}
  crop: 16
data: {{train: {dir}/shapes/hi-000000.tar, held_out: {dir}/shapes/hi-000000.tar, image: {{resolution: 64}}}}
samples: {{count: 2}}
train: {{steps: 6, batch_size: 4}}
logging: {{every: 3, images_every: 1000}}
",
                dir = dir.display()
            ),
        )
        .unwrap();
        run(
            env!("CARGO_BIN_EXE_train-upsampler"),
            &[
                "--config",
                config.to_str().unwrap(),
                "--run-dir",
                dir.join("upsampler").to_str().unwrap(),
            ],
        );
        Self { tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `sample --prior RUN --decoder RUN --out OUT --caption …` and `extra`.
    fn sample(&self, out: &Path, captions: &[&str], extra: &[&str]) -> String {
        let args = self.args(out, captions, extra);
        run(
            env!("CARGO_BIN_EXE_sample"),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    fn args(&self, out: &Path, captions: &[&str], extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--decoder".into(),
            self.path("decoder").display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--device".into(),
            "cpu".into(),
        ];
        if !extra.contains(&"--no-prior") && !extra.contains(&"--prior") {
            args.extend(["--prior".into(), self.path("prior").display().to_string()]);
        }
        for c in captions {
            args.extend(["--caption".into(), c.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }
}

fn png(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// One training of the runs for all the checks: they take most of the time.
#[test]
fn sample_text_to_image() {
    let runs = Runs::train();
    writes_images_grid_and_manifest_and_repeats_with_its_seed(&runs);
    the_caption_the_prior_and_the_guidance_reach_the_decoder(&runs);
    the_upsampler_continues_the_decoders_images(&runs);
    the_autoregressive_prior_drives_the_decoder(&runs);
    runs_that_do_not_fit_together_and_bad_options_are_refused(&runs);
    evaluate_scores_the_prior_alone(&runs);
    evaluate_scores_the_pipelines_images(&runs);
    evaluate_refuses_bad_options(&runs);
    export_writes_a_diffusers_unclip_pipeline(&runs);
    manipulations::manipulations_invert_and_decode(&runs);
    a_text_embedding_decoder_decodes_z_t_and_follows_no_prior(&runs);
}

/// `decoder.embedding: text` (the paper's text-embedding decoder baseline): the same weights
/// under that key decode exactly what the image-embedding decoder decodes from z_t, and whatever
/// would give it an image embedding (a prior, the real images' z_i, a manipulation, an export
/// behind a prior) is refused, naming the key, before anything is written.
fn a_text_embedding_decoder_decodes_z_t_and_follows_no_prior(runs: &Runs) {
    let text_decoder = runs.path("decoder-text");
    copy_run(&runs.path("decoder"), &text_decoder, |config| {
        config.replacen("decoder:\n", "decoder:\n  embedding: text\n", 1)
    });
    let text_decoder = text_decoder.to_str().unwrap();
    let captions = ["a red circle", "a small blue square"];
    runs.sample(&runs.path("zt-image"), &captions, &["--no-prior"]);
    let mut args = runs.args(&runs.path("zt-text"), &captions, &["--no-prior"]);
    args[1] = text_decoder.to_string();
    run(
        env!("CARGO_BIN_EXE_sample"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for name in ["000_00.png", "001_00.png"] {
        assert_eq!(
            png(&runs.path("zt-image").join(name)),
            png(&runs.path("zt-text").join(name)),
            "{name}"
        );
    }
    let out = runs.path("text-refused");
    let input = manipulations::input_images(runs, 1).remove(0);
    let prior = runs.path("prior");
    let prior = prior.to_str().unwrap();
    let data = runs.path("shapes").join("val-000000.tar");
    let data = data.to_str().unwrap();
    let (sample, evaluate) = (env!("CARGO_BIN_EXE_sample"), env!("CARGO_BIN_EXE_evaluate"));
    let cpu = ["--device", "cpu"];
    for (bin, args) in [
        (sample, vec!["--prior", prior, "--caption", "a red circle"]),
        (sample, vec!["--variations", input.to_str().unwrap()]),
        (evaluate, vec!["--true-image-embeddings", "--data", data]),
        (env!("CARGO_BIN_EXE_export"), vec!["--prior", prior]),
    ] {
        let mut all = vec!["--decoder", text_decoder, "--out", out.to_str().unwrap()];
        all.extend(&args);
        if bin != env!("CARGO_BIN_EXE_export") {
            all.extend(cpu);
        }
        let err = run_fails(bin, &all);
        assert!(err.contains("decoder.embedding: text"), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

/// `sample --prior` with an autoregressive prior run: its embeddings (unit vectors, repeatable
/// by seed, caption-dependent) reach the decoder; `--prior-sampling` takes its own keys and
/// refuses a diffusion sampler's.
fn the_autoregressive_prior_drives_the_decoder(runs: &Runs) {
    let ar = runs.path("prior-ar");
    let pipeline =
        Pipeline::load(Some(&ar), &runs.path("decoder"), None, tch::Device::Cpu).unwrap();
    let mut o = pipeline.default_options();
    o.count = 2;
    let a = pipeline.generate(&["a red circle"], &o).unwrap();
    assert!(pipeline
        .generate(&["a red circle"], &o)
        .unwrap()
        .image_embeds
        .equal(&a.image_embeds));
    let b = pipeline.generate(&["a green star"], &o).unwrap();
    assert!(!b.image_embeds.equal(&a.image_embeds));
    let norms = a
        .image_embeds
        .norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
    assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-4);
    assert!(a.prior_scores.is_some());
    // Its sampling settings reach it: another temperature, other draws from the same seed.
    let mut cold = o.clone();
    cold.prior_sampling = PriorSampling::Autoregressive(ArSampling {
        temperature: 0.05,
        dot_quantile: None,
    });
    let c = pipeline.generate(&["a red circle"], &cold).unwrap();
    assert!(!c.image_embeds.equal(&a.image_embeds));
    // A diffusion prior's sampler does not fit it.
    let mut wrong = o.clone();
    wrong.prior_sampling = pipeline_with_diffusion_prior(runs)
        .default_options()
        .prior_sampling;
    assert!(pipeline.check(&wrong).is_err());
    let out = runs.path("out-ar");
    let ar_arg = ar.display().to_string();
    let printed = runs.sample(
        &out,
        &["a red circle"],
        &[
            "--prior",
            &ar_arg,
            "--count",
            "1",
            "--prior-sampling",
            "{temperature: 0.5}",
        ],
    );
    assert!(
        printed.contains("autoregressive, temperature 0.5, z_i · z_t band at quantile 0.9"),
        "{printed}"
    );
    assert!(out.join("grid.png").is_file(), "{printed}");
    let args = runs.args(
        &runs.path("refused-ar"),
        &["a red circle"],
        &["--prior", &ar_arg, "--prior-sampling", "{steps: '4'}"],
    );
    let err = run_fails(
        env!("CARGO_BIN_EXE_sample"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        err.contains("--prior-sampling") && err.contains("steps"),
        "{err}"
    );
}

fn pipeline_with_diffusion_prior(runs: &Runs) -> Pipeline {
    Pipeline::load(
        Some(&runs.path("prior")),
        &runs.path("decoder"),
        None,
        tch::Device::Cpu,
    )
    .unwrap()
}

fn the_upsampler_continues_the_decoders_images(runs: &Runs) {
    let out = runs.path("out-up");
    let up = runs.path("upsampler");
    let extra = [
        "--upsampler",
        up.to_str().unwrap(),
        "--count",
        "2",
        "--upsampler-sampling",
        "{steps: ddim2}",
    ];
    let printed = runs.sample(&out, &["a red circle"], &extra);
    assert!(printed.contains("32 → 64 px, Ddim ddim2"), "{printed}");
    let first = png(&out.join("000_00.png"));
    assert_eq!(first.dimensions(), (64, 64));
    assert_eq!(png(&out.join("grid.png")).dimensions(), (2 * 64, 64));
    // The same seed repeats the upsampled images too.
    let again = runs.path("out-up-again");
    runs.sample(&again, &["a red circle"], &extra);
    assert_eq!(png(&again.join("000_01.png")), png(&out.join("000_01.png")));

    // The upsampler is given the decoder's images: the pipeline's output is the run's own
    // upsampling of what the pipeline without it decodes, from the stage's seeded noise.
    let load = || pipeline_with_diffusion_prior(runs);
    let plain = load();
    let mut o = plain.default_options();
    o.count = 2;
    let decoded = plain.generate(&["a red circle"], &o).unwrap().images;
    let chained = load().with_upsamplers(std::slice::from_ref(&up)).unwrap();
    assert_eq!(chained.resolution(), 64);
    let mut o = chained.default_options();
    o.count = 2;
    let upsampled = chained.generate(&["a red circle"], &o).unwrap().images;
    assert_eq!(upsampled.size(), [2, 3, 64, 64]);
    tch::manual_seed(o.seed + 1);
    let noise = tch::Tensor::randn([2, 3, 64, 64], (tch::Kind::Float, tch::Device::Cpu));
    let expected = chained.upsamplers[0].upsample(&decoded, noise).unwrap();
    assert!(upsampled.allclose(&expected, 1e-5, 1e-5, false));
    // Another low-resolution input changes the output.
    tch::manual_seed(o.seed + 1);
    let noise = tch::Tensor::randn([2, 3, 64, 64], (tch::Kind::Float, tch::Device::Cpu));
    let other = chained.upsamplers[0]
        .upsample(&decoded.flip([2]), noise)
        .unwrap();
    assert!(!other.allclose(&expected, 1e-3, 1e-3, false));
}

fn writes_images_grid_and_manifest_and_repeats_with_its_seed(runs: &Runs) {
    let captions = ["a red circle", "two blue squares"];
    let out = runs.path("out");
    let stdout = runs.sample(&out, &captions, &["--count", "3", "--seed", "5"]);
    // Each stage's guidance and sampler come from its run's config (prior defaults 2 and 2
    // candidates; the decoder's 3 and the test config's DDIM over 4 steps).
    assert!(
        stdout.contains("guidance 2, 2 candidates, Ddim 8"),
        "{stdout}"
    );
    assert!(
        stdout.contains("guidance 3, Ddim 4; 3 images of 32 px"),
        "{stdout}"
    );
    for caption in captions {
        assert!(
            stdout.contains(&format!("{caption:?}: cos(CLIP(image), z_t)")),
            "{stdout}"
        );
        assert!(stdout.contains("other captions"), "{stdout}");
    }
    let mut draws = Vec::new();
    for i in 0..2 {
        for k in 0..3 {
            let img = png(&out.join(format!("{i:03}_{k:02}.png")));
            assert_eq!(img.dimensions(), (32, 32));
            draws.push(img);
        }
    }
    assert_ne!(
        draws[0], draws[1],
        "two draws of one caption are the same image"
    );
    assert_eq!(png(&out.join("grid.png")).dimensions(), (3 * 32, 2 * 32));
    let manifest: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("samples.json")).unwrap()).unwrap();
    assert_eq!(manifest.len(), 6);
    assert_eq!(manifest[4]["caption"], "two blue squares");
    assert_eq!(manifest[4]["file"], "001_01.png");
    for m in &manifest {
        for key in ["clip_score", "clip_image_score", "prior_score"] {
            let v = m[key].as_f64().unwrap_or_else(|| panic!("{key} in {m}"));
            assert!((-1.0..=1.0).contains(&v), "{key} {v}");
        }
    }
    // The printed CLIP score of a caption is the mean of its images' in the manifest.
    let printed: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("\"two blue squares\": cos(CLIP(image), z_t) "))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    let mean = manifest[3..]
        .iter()
        .map(|m| m["clip_score"].as_f64().unwrap())
        .sum::<f64>()
        / 3.0;
    assert!((printed - mean).abs() < 1e-4, "{printed} against {mean}");
    // --decoder-sampling changes the keys it names and keeps the rest of the config's sampler.
    let stdout = runs.sample(
        &runs.path("steps"),
        &["a red circle"],
        &["--count", "1", "--decoder-sampling", "{steps: \"2\"}"],
    );
    assert!(stdout.contains("guidance 3, Ddim 2; 1 images"), "{stdout}");
    // The same seed makes the same images, a caption file the same as --caption.
    let file = runs.path("captions.txt");
    std::fs::write(&file, "a red circle\n\ntwo blue squares\n").unwrap();
    let again = runs.path("again");
    runs.sample(
        &again,
        &[],
        &[
            "--captions",
            file.to_str().unwrap(),
            "--count",
            "3",
            "--seed",
            "5",
        ],
    );
    for name in ["000_00.png", "001_02.png", "grid.png"] {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(again.join(name)).unwrap(),
            "{name} differs with the same seed"
        );
    }
}

fn the_caption_the_prior_and_the_guidance_reach_the_decoder(runs: &Runs) {
    let pipeline = Pipeline::load(
        Some(&runs.path("prior")),
        &runs.path("decoder"),
        None,
        tch::Device::Cpu,
    )
    .unwrap();
    let mut o = pipeline.default_options();
    o.count = 1;
    let images = |caption: &str, o: &unclip_cli::pipeline::PipelineOptions| {
        pipeline.generate(&[caption], o).unwrap()
    };
    let base = images("a red circle", &o);
    assert!(images("a red circle", &o).images.equal(&base.images));
    // Same seed, so the same noise: what differs comes from the conditioning.
    let other = images("a green star", &o);
    assert!(
        !other.images.equal(&base.images),
        "the caption did not reach the decoder"
    );
    assert!(!other.image_embeds.equal(&base.image_embeds));
    let mut guided = o.clone();
    guided.decoder_guidance = 1.0;
    assert!(!images("a red circle", &guided).images.equal(&base.images));
    let mut prior_guided = o.clone();
    prior_guided.prior_guidance = 1.0;
    let p = images("a red circle", &prior_guided);
    assert!(!p.image_embeds.equal(&base.image_embeds));
    // Decoding in chunks keeps each image with its caption (DDIM draws no noise per step).
    let mut two = o.clone();
    two.count = 2;
    let whole = pipeline
        .generate(&["a red circle", "a green star"], &two)
        .unwrap();
    two.batch_size = 3;
    let chunked = pipeline
        .generate(&["a red circle", "a green star"], &two)
        .unwrap();
    assert!(whole.images.allclose(&chunked.images, 1e-4, 1e-4, false));
    // The prior's sample is a unit vector.
    let norm = base.image_embeds.norm().double_value(&[]);
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    // Without a prior the decoder is given z_t.
    let zero_shot = Pipeline::load(None, &runs.path("decoder"), None, tch::Device::Cpu).unwrap();
    let z = zero_shot.generate(&["a red circle"], &o).unwrap();
    let z_t = zero_shot
        .encoder
        .encode(&["a red circle"])
        .unwrap()
        .text_embeds;
    assert!(z.image_embeds.allclose(&z_t, 1e-6, 1e-6, false));
    assert!(z.prior_scores.is_none());
    // Same caption, same noise, z_t for the prior's sample: the image embedding reaches the decoder.
    assert!(
        !z.images.equal(&base.images),
        "the image embedding did not reach the decoder"
    );
}

fn runs_that_do_not_fit_together_and_bad_options_are_refused(runs: &Runs) {
    let out = runs.path("refused");
    let sample = env!("CARGO_BIN_EXE_sample");
    // A prior whose config names another CLIP (a copy elsewhere is another path).
    let copy = runs.path("clip-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(runs.path("clip")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
    }
    let other_prior = runs.path("prior-other");
    let clip = runs.path("clip").display().to_string();
    copy_run(&runs.path("prior"), &other_prior, |config| {
        config.replace(&clip, &copy.display().to_string())
    });
    let args = runs.args(
        &out,
        &["a red circle"],
        &["--prior", other_prior.to_str().unwrap()],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = run_fails(sample, &args);
    assert!(err.contains("was trained on the CLIP"), "{err}");
    assert!(err.contains("clip-copy"), "{err}");

    for (extra, expect) in [
        (
            vec!["--decoder-sampling", "{sampler: ddim, steps: \"5000\"}"],
            "decoder sampling steps",
        ),
        (
            vec!["--decoder-sampling", "{sampler: euler}"],
            "--decoder-sampling",
        ),
        (vec!["--prior-guidance=-1"], "prior guidance"),
        (vec!["--precision", "fp8"], "--precision"),
        (vec!["--count", "0"], "count must be at least 1"),
    ] {
        let args = runs.args(&out, &["a red circle"], &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = run_fails(sample, &args);
        assert!(err.contains(expect), "{extra:?}: {err}");
    }
    // A second stage must take what the first makes (64 px, not this run's 32).
    let up = runs.path("upsampler");
    let up = up.to_str().unwrap();
    let args = runs.args(
        &out,
        &["a red circle"],
        &["--upsampler", up, "--upsampler", up],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = run_fails(sample, &args);
    assert!(
        err.contains("takes 32 px images but the upsampler run") && err.contains("makes 64 px"),
        "{err}"
    );
    let err = run_fails(
        sample,
        &[
            "--no-prior",
            "--decoder",
            runs.path("shapes").to_str().unwrap(),
            "--caption",
            "x",
        ],
    );
    assert!(err.contains("not a train-decoder run directory"), "{err}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}

/// `evaluate ARGS --data VAL --out OUT --device cpu`: its report.
fn evaluate(runs: &Runs, out: &str, args: &[&str]) -> serde_json::Value {
    let data = runs.path("shapes").join("val-000000.tar");
    let out = runs.path(out);
    let mut all = vec![
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    all.extend(args);
    run(env!("CARGO_BIN_EXE_evaluate"), &all);
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The held-out embeddings `embed` wrote for val-000000.tar.
fn stored_val_embeddings(runs: &Runs) -> Vec<unclip_data::embeddings::EmbeddingSample> {
    let shards = runs.path("emb").join("val-000000.tar");
    let reader = unclip_data::reader::ShardReader::with_parser(
        &unclip_data::reader::ReaderConfig::in_order(shards.display().to_string()),
        0,
        unclip_data::embeddings::parse_embedding_sample,
    )
    .unwrap();
    reader.iter().collect()
}

/// `evaluate --prior`: the real images and captions embedded as `embed` embeds them (the z_t
/// baseline equals the stored pairs'), one row per guidance scale, the same report from the same
/// seed, another from another sampler, and the codec's round trip for the autoregressive prior.
fn evaluate_scores_the_prior_alone(runs: &Runs) {
    let prior = runs.path("prior");
    let args = [
        "--prior",
        prior.to_str().unwrap(),
        "--prior-guidance",
        "1,2",
    ];
    let report = evaluate(runs, "eval-prior", &args);
    let stored = stored_val_embeddings(runs);
    assert_eq!(report["samples"], stored.len());
    let baseline = stored
        .iter()
        .map(|s| {
            s.image_emb
                .iter()
                .zip(&s.text_emb)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
        })
        .sum::<f64>()
        / stored.len() as f64;
    let eval = &report["prior_eval"];
    assert!(
        (f(&eval["baseline_cos_zt_zi"]) - baseline).abs() < 2e-3,
        "{eval} vs the stored pairs' {baseline}"
    );
    assert!(eval["codec_round_trip"].is_null(), "{eval}");
    let rows = eval["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (f(&rows[0]["guidance"]), f(&rows[1]["guidance"])),
        (1.0, 2.0)
    );
    for row in rows {
        for key in ["cos_sample_zi", "cos_sample_zt"] {
            assert!(f(&row[key]).abs() <= 1.0 + 1e-6, "{row}");
        }
        // More held-out captions than the 5 neighbours: the samples' precision and recall.
        assert!(stored.len() > 5);
        for key in ["precision", "recall", "coverage"] {
            assert!((0.0..=1.0).contains(&f(&row["manifold"][key])), "{row}");
        }
    }
    assert_ne!(rows[0]["cos_sample_zi"], rows[1]["cos_sample_zi"]);
    assert_eq!(report["prior"]["sampling"], "Ddim 8");
    assert_eq!(
        evaluate(runs, "eval-prior-again", &args)["prior_eval"],
        *eval
    );
    let other = evaluate(
        runs,
        "eval-prior-steps",
        &[&args[..], &["--prior-sampling", "{steps: '3'}"]].concat(),
    );
    assert_eq!(other["prior"]["sampling"], "Ddim 3");
    assert_ne!(other["prior_eval"]["rows"], eval["rows"]);

    let ar = runs.path("prior-ar");
    let report = evaluate(runs, "eval-prior-ar", &["--prior", ar.to_str().unwrap()]);
    let eval = &report["prior_eval"];
    let round_trip = f(&eval["codec_round_trip"]);
    assert!(round_trip > 0.5 && round_trip <= 1.0 + 1e-6, "{eval}");
    assert_eq!(eval["rows"].as_array().unwrap().len(), 1);
}

/// `evaluate --decoder`: one row per guidance pair; the shapes it counts are those of the images
/// it saves (each draw scored against its own sample's scene), its CLIP score theirs against
/// their own captions; the real images' count is the shards' own; without a prior no prior row.
fn evaluate_scores_the_pipelines_images(runs: &Runs) {
    let (prior, decoder) = (runs.path("prior"), runs.path("decoder"));
    let report = evaluate(
        runs,
        "eval-images",
        &[
            "--prior",
            prior.to_str().unwrap(),
            "--decoder",
            decoder.to_str().unwrap(),
            "--decoder-guidance",
            "1,3",
            "--count",
            "2",
            "--batch-size",
            "6",
            "--save-images",
        ],
    );
    assert_eq!(report["samples"], 8);
    assert_eq!(report["count"], 2);
    // The shards' own images and scenes, scored independently of `evaluate`.
    let data = runs.path("shapes").join("val-000000.tar");
    let reader = unclip_data::reader::ShardReader::new(
        &unclip_data::reader::ReaderConfig::in_order(data.display().to_string()),
        0,
    )
    .unwrap();
    let samples: Vec<_> = reader.iter().collect();
    let scenes: Vec<unclip_data::shapes::Scene> = samples
        .iter()
        .map(|s| serde_json::from_value(s.metadata.clone().unwrap()).unwrap())
        .collect();
    let mut real = unclip_data::shape_score::ShapeTally::default();
    for (s, scene) in samples.iter().zip(&scenes) {
        let img = image::load_from_memory(&s.image).unwrap().to_rgb8();
        real.add(&unclip_data::shape_score::score_scene(&img, scene));
    }
    assert_eq!(
        report["real"]["shapes"],
        serde_json::to_value(real).unwrap()
    );
    let rows = report["images"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let encoder =
        unclip_clip::caption::CaptionEncoder::load(&runs.path("clip"), tch::Device::Cpu).unwrap();
    let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
    let z_t = encoder.encode(&captions).unwrap().text_embeds;
    for (row, dg) in rows.iter().zip([1.0, 3.0]) {
        assert_eq!(f(&row["decoder_guidance"]), dg);
        assert_eq!(f(&row["prior_guidance"]), 2.0);
        let dir = runs
            .path("eval-images")
            .join(format!("images/prior-g2_decoder-g{dg}"));
        let mut tally = unclip_data::shape_score::ShapeTally::default();
        let (mut pixels, mut own) = (Vec::new(), Vec::new());
        for (i, scene) in scenes.iter().enumerate() {
            for k in 0..2 {
                let img = png(&dir.join(format!("{i:03}_{k:02}.png")));
                tally.add(&unclip_data::shape_score::score_scene(&img, scene));
                pixels.extend(
                    img.pixels()
                        .flat_map(|p| p.0)
                        .map(|v| v as f32 / 127.5 - 1.0),
                );
                own.push(i as i64);
            }
        }
        assert_eq!(row["shapes"], serde_json::to_value(tally).unwrap());
        let images = tch::Tensor::from_slice(&pixels)
            .view([16, 32, 32, 3])
            .permute([0, 3, 1, 2]);
        let z_x = encoder.clip.embed_images(&images).unwrap();
        let cos = (z_x * z_t.index_select(0, &tch::Tensor::from_slice(&own)))
            .sum_dim_intlist(-1, false, tch::Kind::Float)
            .mean(tch::Kind::Double)
            .double_value(&[]);
        assert!((f(&row["clip_score"]) - cos).abs() < 5e-3, "{row} vs {cos}");
        let top1 = f(&row["clip_top1"]);
        assert!((0.0..=1.0).contains(&top1), "{row}");
        assert!(f(&row["fd_clip"]) > 0.0, "{row}");
        // 16 images against 8 real ones: enough for 5-neighbour balls (the figures are checked
        // against prdc in evaluate_metrics).
        let m = &row["manifold"];
        for key in ["precision", "recall", "coverage"] {
            assert!((0.0..=1.0).contains(&f(&m[key])), "{key} in {row}");
        }
        assert!(f(&m["density"]) >= 0.0, "{row}");
    }
    assert_ne!(rows[0]["clip_score"], rows[1]["clip_score"]);
    assert!(report["prior_eval"]["rows"].as_array().unwrap().len() == 1);

    let report = evaluate(
        runs,
        "eval-no-prior",
        &["--no-prior", "--decoder", decoder.to_str().unwrap()],
    );
    assert!(report.get("prior").is_none() && report.get("prior_eval").is_none());
    let rows = report["images"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["prior_guidance"].is_null());
    assert_eq!(rows[0]["conditioning"], "text_embedding");
    assert_eq!(f(&rows[0]["decoder_guidance"]), 3.0);
    let report = evaluate(
        runs,
        "eval-true-zi",
        &[
            "--true-image-embeddings",
            "--decoder",
            decoder.to_str().unwrap(),
        ],
    );
    let rows = report["images"].as_array().unwrap();
    assert_eq!(rows[0]["conditioning"], "true_image_embedding");
    assert!(rows[0]["prior_guidance"].is_null());
    assert_ne!(
        rows[0]["clip_image_score"],
        report_no_prior_clip_image(runs)
    );

    // Given embeddings are what the decoder decodes: given z_t, the no-prior images exactly.
    let pipeline = Pipeline::load(None, &decoder, None, tch::Device::Cpu).unwrap();
    let mut o = pipeline.default_options();
    o.count = 2;
    let captions = ["a red circle", "two blue squares"];
    let z_t = pipeline.encoder.encode(&captions).unwrap().text_embeds;
    let given = pipeline.generate_from(&captions, Some(&z_t), &o).unwrap();
    let plain = pipeline.generate(&captions, &o).unwrap();
    assert!(given.images.equal(&plain.images));
    let rows = tch::Tensor::from_slice(&[0i64, 0, 1, 1]);
    assert!(given.image_embeds.equal(&z_t.index_select(0, &rows)));
    let other = z_t.flip([0]);
    let swapped = pipeline.generate_from(&captions, Some(&other), &o).unwrap();
    assert!(!swapped.images.equal(&plain.images));
    assert!(pipeline
        .generate_from(&captions, Some(&z_t.narrow(0, 0, 1)), &o)
        .is_err());
}

/// The no-prior report's `clip_image_score` (written by the test before).
fn report_no_prior_clip_image(runs: &Runs) -> serde_json::Value {
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(runs.path("eval-no-prior").join("report.json")).unwrap(),
    )
    .unwrap();
    report["images"][0]["clip_image_score"].clone()
}

fn evaluate_refuses_bad_options(runs: &Runs) {
    let bin = env!("CARGO_BIN_EXE_evaluate");
    let (prior, decoder) = (runs.path("prior"), runs.path("decoder"));
    let (prior, decoder) = (prior.to_str().unwrap(), decoder.to_str().unwrap());
    let data = runs.path("shapes").join("val-000000.tar");
    let data = data.to_str().unwrap();
    let out = runs.path("eval-refused");
    let out = out.to_str().unwrap();
    let missing = runs.path("shapes").join("none-{000000..000001}.tar");
    for (args, expect) in [
        (vec!["--decoder", decoder], "--no-prior"),
        (
            vec![
                "--true-image-embeddings",
                "--prior",
                prior,
                "--decoder",
                decoder,
            ],
            "cannot be used with",
        ),
        (vec!["--no-prior", "--prior", prior], "cannot be used with"),
        (vec!["--prior", prior, "--count", "2"], "--decoder"),
        (
            vec!["--prior", prior, "--prior-guidance=-1"],
            "--prior-guidance",
        ),
        (
            vec!["--no-prior", "--decoder", decoder, "--prior-guidance", "2"],
            "--prior-guidance without a prior",
        ),
        (
            vec![
                "--prior",
                prior,
                "--decoder",
                decoder,
                "--decoder-sampling",
                "{steps: '5000'}",
            ],
            "decoder sampling steps",
        ),
        (
            vec!["--prior", prior, "--data", missing.to_str().unwrap()],
            "none-",
        ),
    ] {
        let mut all = vec!["--out", out, "--device", "cpu"];
        if !args.contains(&"--data") {
            all.extend(["--data", data]);
        }
        all.extend(&args);
        let err = run_fails(bin, &all);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    assert!(!runs.path("eval-refused").join("report.json").exists());
}

/// Every variable of `a` equal to `b`'s of the same name, and no other names.
fn assert_same_variables(a: &tch::nn::VarStore, b: &tch::nn::VarStore, what: &str) {
    let (a, b) = (a.variables(), b.variables());
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    let mut other: Vec<&String> = b.keys().collect();
    other.sort();
    assert_eq!(names, other, "{what}");
    for name in names {
        assert!(a[name].equal(&b[name]), "{what}: {name} differs");
    }
}

/// `export`: the prior, decoder (with text_proj), upsampler (twice) and text encoder read back
/// with the same configs and weights; the tokenizer's files give our ids; the schedulers follow
/// each run's process; the refusals name the key, and leave nothing behind.
fn export_writes_a_diffusers_unclip_pipeline(runs: &Runs) {
    use tch::Device::Cpu;
    let bin = env!("CARGO_BIN_EXE_export");
    let out = runs.path("exported");
    let (prior, decoder, up) = (
        runs.path("prior"),
        runs.path("decoder"),
        runs.path("upsampler"),
    );
    let args = [
        "--prior",
        prior.to_str().unwrap(),
        "--decoder",
        decoder.to_str().unwrap(),
        "--upsampler",
        up.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let printed = run(bin, &args);
    assert!(printed.contains("UnCLIPPipeline"), "{printed}");
    // Normalised runs: the reminder to wrap the text encoder (raw ones: tests/raw_embeddings.rs).
    assert!(
        printed.contains("note: these models were trained on L2-normalised z_t"),
        "{printed}"
    );
    let json = |path: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(path)).unwrap())
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let index = json("model_index.json");
    assert_eq!(index["_class_name"], "UnCLIPPipeline");
    for (component, class) in [
        ("prior", "PriorTransformer"),
        ("decoder", "UNet2DConditionModel"),
        ("text_proj", "UnCLIPTextProjModel"),
        ("super_res_first", "UNet2DModel"),
        ("super_res_last", "UNet2DModel"),
        ("text_encoder", "CLIPTextModelWithProjection"),
        ("tokenizer", "CLIPTokenizer"),
        ("prior_scheduler", "UnCLIPScheduler"),
        ("decoder_scheduler", "UnCLIPScheduler"),
        ("super_res_scheduler", "UnCLIPScheduler"),
    ] {
        assert_eq!(index[component][1], class, "{index}");
        assert!(out.join(component).is_dir(), "{component}");
    }

    let pipeline = Pipeline::load(Some(&prior), &decoder, None, Cpu)
        .unwrap()
        .with_upsamplers(std::slice::from_ref(&up))
        .unwrap();
    let loaded = unclip_prior::load::load_diffusers_prior(&out.join("prior"), Cpu).unwrap();
    assert_same_variables(&loaded.vs, &pipeline.prior.as_ref().unwrap().vs, "prior");
    let loaded = unclip_decoder::load_diffusers_decoder(&out, Cpu).unwrap();
    assert_eq!(loaded.config, pipeline.decoder.cfg.decoder.model);
    assert_same_variables(&loaded.vs, &pipeline.decoder.vs, "decoder");
    for name in ["super_res_first", "super_res_last"] {
        let loaded =
            unclip_upsampler::diffusers::load_diffusers_upsampler(&out.join(name), Cpu).unwrap();
        assert_eq!(loaded.config, pipeline.upsamplers[0].cfg.upsampler.model);
        assert_same_variables(&loaded.vs, &pipeline.upsamplers[0].vs, name);
    }

    // The text encoder: transformers' config of the CLIP's text tower, its weights by name.
    let clip = &pipeline.encoder.clip;
    let config = json("text_encoder/config.json");
    let t = &clip.model.cfg.text;
    assert_eq!(config["hidden_size"], t.width);
    assert_eq!(config["num_hidden_layers"], t.layers);
    assert_eq!(config["max_position_embeddings"], t.context_length);
    assert_eq!(config["projection_dim"], clip.model.cfg.embed_dim);
    let weights =
        tch::Tensor::read_safetensors(out.join("text_encoder/model.safetensors")).unwrap();
    let ours = clip.vs.variables();
    let text_vars = ours
        .keys()
        .filter(|n| n.starts_with("text_model.") || *n == "text_projection.weight")
        .count();
    assert_eq!(weights.len(), text_vars);
    for (name, w) in &weights {
        assert!(w.equal(&ours[name]), "text_encoder {name}");
    }

    // The tokenizer: vocab.json gives a caption's ids; merges.txt holds every merge after a
    // version line; padding is the end token (masked).
    let vocab = json("tokenizer/vocab.json");
    assert_eq!(vocab.as_object().unwrap().len(), 49_408);
    let tokenizer = unclip_data::tokenizer::ClipTokenizer::new();
    for id in tokenizer.encode("a large purple hexagon, beige background") {
        let symbol = tokenizer.symbol(id).unwrap();
        assert_eq!(vocab[symbol], id, "{symbol}");
    }
    assert_eq!(vocab["<|startoftext|>"], tokenizer.sot_id());
    assert_eq!(vocab["<|endoftext|>"], tokenizer.eot_id());
    let merges = std::fs::read_to_string(out.join("tokenizer/merges.txt")).unwrap();
    let lines: Vec<&str> = merges.lines().collect();
    assert_eq!(lines.len(), 1 + 48_894);
    assert!(lines[0].starts_with("#version"));
    assert_eq!(
        json("tokenizer/tokenizer_config.json")["model_max_length"],
        t.context_length
    );

    // The schedulers follow each run's process.
    let prior_scheduler = json("prior_scheduler/scheduler_config.json");
    assert_eq!(prior_scheduler["prediction_type"], "sample");
    let decoder_scheduler = json("decoder_scheduler/scheduler_config.json");
    assert_eq!(decoder_scheduler["variance_type"], "learned_range");
    assert_eq!(decoder_scheduler["prediction_type"], "epsilon");

    // Refused: an existing directory; the autoregressive prior; a v-predicting decoder (a copy of
    // the run whose config says so). Nothing is left behind.
    let err = run_fails(bin, &args);
    assert!(err.contains("exists"), "{err}");
    let other = runs.path("exported-ar");
    let refused = |prior: &Path, decoder: &Path| {
        run_fails(
            bin,
            &[
                "--prior",
                prior.to_str().unwrap(),
                "--decoder",
                decoder.to_str().unwrap(),
                "--out",
                other.to_str().unwrap(),
            ],
        )
    };
    let err = refused(&runs.path("prior-ar"), &decoder);
    assert!(err.contains("autoregressive (prior.kind)"), "{err}");
    let v_decoder = runs.path("decoder-v");
    copy_run(&decoder, &v_decoder, |config| {
        config.replacen(
            "decoder:\n",
            "decoder:\n  diffusion: {predict: v, variance: learned_range, loss: hybrid}\n",
            1,
        )
    });
    let err = refused(&prior, &v_decoder);
    assert!(err.contains("decoder.diffusion.predict is v"), "{err}");
    assert!(!other.exists());
    assert!(!runs.path(".exported-ar.partial").exists());
}

/// A copy of run directory `from` at `to` with its config.yaml rewritten by `edit`.
fn copy_run(from: &Path, to: &Path, edit: impl Fn(&str) -> String) {
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
    let config = std::fs::read_to_string(from.join("config.yaml")).unwrap();
    let edited = edit(&config);
    assert_ne!(edited, config);
    std::fs::write(to.join("config.yaml"), edited).unwrap();
}
