//! Which committed configs `export` can write as a diffusers UnCLIPPipeline: the schedulers the
//! paper's prior, decoder and first upsampler map to, and the refusals (the second upsampler's
//! linear schedule, the shapes decoder's v prediction) naming the key.
use std::path::Path;
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
