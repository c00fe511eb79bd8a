//! Which committed configs `export` can write as a diffusers UnCLIPPipeline: the schedulers the
//! paper's prior, decoder and first upsampler map to, and the refusals (the second upsampler's
//! linear schedule, the shapes decoder's v prediction) naming the key; and that `configs/karlo/`
//! describes Karlo as diffusers builds it (`scripts/fixtures/karlo.py`).
use std::path::Path;
mod common;
use common::{dry_run_total, run};
use unclip_cli::export::unclip_scheduler;
use unclip_decoder::task::DecoderTrainConfig;
use unclip_prior::task::PriorTrainConfig;
use unclip_train::load_config;
use unclip_upsampler::task::UpsamplerTrainConfig;

fn config(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name)
}

#[test]
fn the_paper_stack_maps_to_unclip_schedulers() {
    let p = load_config::<PriorTrainConfig>(&config("paper/prior.yaml"), &[])
        .unwrap()
        .task
        .prior;
    let s = unclip_scheduler(&p.diffusion, &p.sampling.clip, "prior").unwrap();
    assert_eq!(s["prediction_type"], "sample");
    assert_eq!(s["variance_type"], "fixed_small_log");
    assert_eq!(s["num_train_timesteps"], 1000);

    let d = load_config::<DecoderTrainConfig>(&config("paper/decoder.yaml"), &[])
        .unwrap()
        .task
        .decoder;
    let s = unclip_scheduler(&d.diffusion, &d.sampling.clip, "decoder").unwrap();
    assert_eq!(s["prediction_type"], "epsilon");
    assert_eq!(s["variance_type"], "learned_range");
    assert_eq!(s["clip_sample"], true);
    assert_eq!(s["clip_sample_range"], 1.0);

    let u = load_config::<UpsamplerTrainConfig>(&config("paper/upsampler-256.yaml"), &[])
        .unwrap()
        .task
        .upsampler;
    let s = unclip_scheduler(&u.diffusion, &u.sampling.clip, "upsampler").unwrap();
    assert_eq!(s["prediction_type"], "epsilon");
}

#[test]
fn what_unclip_scheduler_cannot_step_is_refused_naming_the_key() {
    let u = load_config::<UpsamplerTrainConfig>(&config("paper/upsampler-1024.yaml"), &[])
        .unwrap()
        .task
        .upsampler;
    let err = unclip_scheduler(&u.diffusion, &u.sampling.clip, "upsampler").unwrap_err();
    assert!(
        err.to_string().contains("upsampler.diffusion.schedule"),
        "{err}"
    );

    let d = load_config::<DecoderTrainConfig>(&config("shapes/decoder.yaml"), &[])
        .unwrap()
        .task
        .decoder;
    let err = unclip_scheduler(&d.diffusion, &d.sampling.clip, "decoder").unwrap_err();
    assert!(
        err.to_string().contains("decoder.diffusion.predict is v"),
        "{err}"
    );

    let mut dynamic = d.clone();
    dynamic.diffusion.predict = unclip_diffusion::MeanType::Epsilon;
    dynamic.sampling.clip = unclip_diffusion::ClipDenoised::Dynamic {
        percentile: 0.99,
        max_value: None,
    };
    let err = unclip_scheduler(&dynamic.diffusion, &dynamic.sampling.clip, "decoder").unwrap_err();
    assert!(err.to_string().contains("decoder.sampling.clip"), "{err}");
}

/// Karlo's pipeline layout without weights: each part's config.json and parameter count.
fn karlo_fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/karlo")
}

/// `SECTION.init_from` pointed at the fixture (the configs name a downloaded directory).
fn karlo_init(section: &str) -> Vec<String> {
    vec![format!("{section}.init_from={}", karlo_fixture().display())]
}

fn karlo_json(path: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(karlo_fixture().join(path)).unwrap()).unwrap()
}

#[test]
fn the_karlo_configs_build_karlo_and_sample_with_its_schedulers() {
    let counts = karlo_json("parameters.json");
    let count = |part: &str| counts[part].as_i64().unwrap();
    for (bin, section, parts) in [
        (env!("CARGO_BIN_EXE_train-prior"), "prior", vec!["prior"]),
        (
            env!("CARGO_BIN_EXE_train-decoder"),
            "decoder",
            vec!["decoder", "text_proj"],
        ),
        (
            env!("CARGO_BIN_EXE_train-upsampler"),
            "upsampler",
            vec!["super_res_first"],
        ),
    ] {
        // `init_from` compares `SECTION.model` with the pipeline's config.json first.
        let printed = run(
            bin,
            &[
                "--config",
                config(&format!("karlo/{section}.yaml")).to_str().unwrap(),
                "--dry-run",
                "--set",
                "device=cpu",
                "--set",
                &format!("{section}.init_from={}", karlo_fixture().display()),
            ],
        );
        let want: i64 = parts.iter().map(|p| count(p)).sum();
        assert_eq!(dry_run_total(&printed), want, "{section}: {printed}");
    }
    // (beta_schedule is UnCLIPScheduler's only one, cosine; unclip_scheduler refuses others.)
    let scheduler_keys = [
        "clip_sample",
        "clip_sample_range",
        "num_train_timesteps",
        "prediction_type",
        "variance_type",
    ];
    let check = |ours: serde_json::Value, theirs: &str| {
        let theirs = karlo_json(&format!("{theirs}/scheduler_config.json"));
        for key in scheduler_keys {
            assert_eq!(ours[key], theirs[key], "{key} of {theirs}");
        }
    };
    let p = load_config::<PriorTrainConfig>(&config("karlo/prior.yaml"), &karlo_init("prior"))
        .unwrap()
        .task
        .prior;
    check(
        unclip_scheduler(&p.diffusion, &p.sampling.clip, "prior").unwrap(),
        "prior_scheduler",
    );
    let d =
        load_config::<DecoderTrainConfig>(&config("karlo/decoder.yaml"), &karlo_init("decoder"))
            .unwrap()
            .task
            .decoder;
    check(
        unclip_scheduler(&d.diffusion, &d.sampling.clip, "decoder").unwrap(),
        "decoder_scheduler",
    );
    let u = load_config::<UpsamplerTrainConfig>(
        &config("karlo/upsampler.yaml"),
        &karlo_init("upsampler"),
    )
    .unwrap()
    .task
    .upsampler;
    check(
        unclip_scheduler(&u.diffusion, &u.sampling.clip, "upsampler").unwrap(),
        "super_res_scheduler",
    );
}
