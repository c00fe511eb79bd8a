//! `clip_embeddings: raw` end to end — the convention of diffusers' UnCLIP pipeline and Karlo:
//! `embed --raw` shards → a diffusion prior and a decoder trained on them → `sample`, with the
//! prior's samples and the caption's z_t left unnormalised; and the refusals: training on shards
//! of the other convention (named before any step) and a pipeline whose stages disagree; and
//! `sample --diffusers` on the runs' export drawing their images.
use std::path::Path;
mod common;
use common::{decoder_config, embed_shapes, embedded_shapes, prior_config, run, run_fails};
use tch::{Device, Kind, Tensor};
use unclip_cli::pipeline::Pipeline;
use unclip_data::npy::NpyArray;

/// `bin --config FILE --run-dir RUN` and `sets` (`key=value` each).
fn train(bin: &str, config: &Path, run_dir: &Path, sets: &[&str]) -> Result<String, String> {
    let mut args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--run-dir".into(),
        run_dir.display().to_string(),
    ];
    for s in sets {
        args.extend(["--set".into(), s.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = std::process::Command::new(bin)
        .args(&args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Row norms of a [N, D] tensor.
fn norms(z: &Tensor) -> Vec<f64> {
    Vec::try_from(&z.to_kind(Kind::Double).norm_scalaropt_dim(2, [1], false)).unwrap()
}

#[test]
fn raw_embeddings_train_and_sample_unnormalised_and_never_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    embedded_shapes(dir, 16, env!("CARGO_BIN_EXE_embed"));
    let raw = dir.join("emb-raw");
    embed_shapes(dir, "emb-raw", env!("CARGO_BIN_EXE_embed"), &["--raw"]);
    let (prior_bin, decoder_bin) = (
        env!("CARGO_BIN_EXE_train-prior"),
        env!("CARGO_BIN_EXE_train-decoder"),
    );
    let prior_yaml = dir.join("prior.yaml");
    // The shared config reads dir/emb; these runs read dir/emb-raw.
    std::fs::write(&prior_yaml, prior_config(dir).replace("/emb/", "/emb-raw/")).unwrap();
    let decoder_yaml = dir.join("decoder.yaml");
    std::fs::write(&decoder_yaml, decoder_config(dir)).unwrap();
    let raw_dir = format!("data.embedding_dir={}", raw.display());
    let short = ["train.steps=2", "logging.images_every=1000"];

    // Shards of the other convention fail before any step, naming the key to set.
    let err = train(prior_bin, &prior_yaml, &dir.join("p-bad"), &[]).unwrap_err();
    assert!(
        err.contains("data.train") && err.contains("set prior.clip_embeddings: raw"),
        "{err}"
    );
    assert!(!dir.join("p-bad/checkpoints").exists());
    let normalised_train = format!(
        "data.train={}/emb/img-{{000000..000001}}.tar",
        dir.display()
    );
    let err = train(
        prior_bin,
        &prior_yaml,
        &dir.join("p-bad2"),
        &["prior.clip_embeddings=raw", &normalised_train],
    )
    .unwrap_err();
    assert!(
        err.contains("L2-normalised") && err.contains("embed --raw"),
        "{err}"
    );
    let err = train(decoder_bin, &decoder_yaml, &dir.join("d-bad"), &[&raw_dir]).unwrap_err();
    assert!(
        err.contains("data.embedding_dir") && err.contains("set decoder.clip_embeddings: raw"),
        "{err}"
    );
    // The autoregressive prior's codec is for normalised embeddings only.
    let err = train(
        prior_bin,
        &prior_yaml,
        &dir.join("p-ar"),
        &[
            "prior.clip_embeddings=raw",
            "prior.kind=autoregressive",
            "prior.model=null",
            "prior.autoregressive={embedding_dim: 32, num_embeddings: 16, components: 4}",
        ],
    )
    .unwrap_err();
    assert!(
        err.contains("prior.clip_embeddings: raw is for the diffusion prior"),
        "{err}"
    );

    // Trained on raw shards, with the key set.
    let prior = dir.join("prior-raw");
    train(
        prior_bin,
        &prior_yaml,
        &prior,
        &["prior.clip_embeddings=raw"],
    )
    .unwrap();
    let decoder = dir.join("decoder-raw");
    let mut sets = vec!["decoder.clip_embeddings=raw", raw_dir.as_str()];
    sets.extend(short);
    train(decoder_bin, &decoder_yaml, &decoder, &sets).unwrap();
    let normalised_decoder = dir.join("decoder");
    train(decoder_bin, &decoder_yaml, &normalised_decoder, &short).unwrap();

    // The prior's samples are in the raw embeddings' scale, not unit vectors.
    let out = dir.join("z.npy");
    let printed = run(
        prior_bin,
        &[
            "--config",
            prior_yaml.to_str().unwrap(),
            "--run-dir",
            prior.to_str().unwrap(),
            "--sample",
            "a red circle",
            "--sample",
            "two blue squares",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(printed.contains("float32, raw embeddings"), "{printed}");
    let z = NpyArray::from_bytes(&std::fs::read(&out).unwrap()).unwrap();
    let z = Tensor::from_slice(&z.to_f32()).view([2, 32]);
    let stored: Vec<f32> = {
        let cfg = unclip_data::reader::ReaderConfig::in_order(
            raw.join("img-000000.tar").display().to_string(),
        );
        unclip_data::reader::ShardReader::with_parser(
            &cfg,
            0,
            unclip_data::embeddings::parse_embedding_sample,
        )
        .unwrap()
        .iter()
        .flat_map(|s| s.image_emb)
        .collect()
    };
    let data_norm = {
        let n = norms(&Tensor::from_slice(&stored).view([-1, 32]));
        n.iter().sum::<f64>() / n.len() as f64
    };
    // The tiny random CLIP's projections have norms near 6.
    assert!((data_norm - 1.0).abs() > 0.5, "raw data norm {data_norm}");
    for n in norms(&z) {
        assert!(
            (n - 1.0).abs() > 1e-2 && n > data_norm / 4.0 && n < data_norm * 4.0,
            "sampled norm {n}, data {data_norm}"
        );
    }

    // Fine-tuning from the raw prior's diffusers export (Karlo's situation): its standardisation
    // fits raw training embeddings, so the scale warning stays quiet; on normalised ones it warns.
    let exported = dir.join("prior-raw-diffusers");
    run(
        prior_bin,
        &[
            "--config",
            prior_yaml.to_str().unwrap(),
            "--run-dir",
            prior.to_str().unwrap(),
            "--export-diffusers",
            exported.to_str().unwrap(),
        ],
    );
    let init = format!("prior.init_from={}", exported.display());
    let tuned = train(
        prior_bin,
        &prior_yaml,
        &dir.join("prior-tuned"),
        &["prior.clip_embeddings=raw", &init, "train.steps=1"],
    )
    .unwrap();
    assert!(!tuned.contains("warning: prior.init_from"), "{tuned}");
    let normalised_held_out = format!("data.held_out={}/emb/val-000000.tar", dir.display());
    let warned = train(
        prior_bin,
        &prior_yaml,
        &dir.join("prior-tuned-normalised"),
        &[
            &init,
            &normalised_train,
            &normalised_held_out,
            "train.steps=1",
        ],
    )
    .unwrap();
    assert!(warned.contains("warning: prior.init_from"), "{warned}");

    // The pipeline hands the decoder raw z_t and raw prior samples.
    let pipeline = Pipeline::load(Some(&prior), &decoder, None, Device::Cpu).unwrap();
    let z_t = pipeline
        .encoder
        .encode(&["a red circle"])
        .unwrap()
        .text_embeds;
    assert!((norms(&z_t)[0] - 1.0).abs() > 1e-2);
    let images = dir.join("images");
    run(
        env!("CARGO_BIN_EXE_sample"),
        &[
            "--prior",
            prior.to_str().unwrap(),
            "--decoder",
            decoder.to_str().unwrap(),
            "--caption",
            "a red circle",
            "--out",
            images.to_str().unwrap(),
            "--device",
            "cpu",
        ],
    );
    assert!(images.read_dir().unwrap().next().is_some());
    // Exported, the raw runs need no wrapper in diffusers: no reminder.
    let printed = run(
        env!("CARGO_BIN_EXE_export"),
        &[
            "--prior",
            prior.to_str().unwrap(),
            "--decoder",
            decoder.to_str().unwrap(),
            "--out",
            dir.join("pipeline").to_str().unwrap(),
        ],
    );
    assert!(
        printed.contains("UnCLIPPipeline") && !printed.contains("note:"),
        "{printed}"
    );

    // `sample --diffusers` on that export draws the runs' images, pixel for pixel, with the same
    // sampling settings (its defaults are diffusers' pipeline's; these are set on both sides).
    let same = [
        "--caption",
        "a red circle",
        "--caption",
        "two blue squares",
        "--count",
        "2",
        "--prior-sampling",
        "{sampler: ddpm, steps: '8'}",
        "--decoder-sampling",
        "{sampler: ddpm, steps: '4'}",
        "--prior-guidance",
        "2",
        "--decoder-guidance",
        "3",
        "--candidates",
        "1",
        "--device",
        "cpu",
    ];
    let (from_runs, from_export) = (dir.join("from-runs"), dir.join("from-export"));
    let mut args = vec![
        "--prior",
        prior.to_str().unwrap(),
        "--decoder",
        decoder.to_str().unwrap(),
        "--out",
        from_runs.to_str().unwrap(),
    ];
    args.extend(same);
    run(env!("CARGO_BIN_EXE_sample"), &args);
    let pipeline_dir = dir.join("pipeline");
    let clip = dir.join("clip");
    let mut args = vec![
        "--diffusers",
        pipeline_dir.to_str().unwrap(),
        "--clip",
        clip.to_str().unwrap(),
        "--out",
        from_export.to_str().unwrap(),
    ];
    args.extend(same);
    run(env!("CARGO_BIN_EXE_sample"), &args);
    for name in ["000_00.png", "000_01.png", "001_00.png", "001_01.png"] {
        let (a, b) = (
            std::fs::read(from_runs.join(name)).unwrap(),
            std::fs::read(from_export.join(name)).unwrap(),
        );
        assert!(a == b, "{name} differs between the runs and their export");
    }
    // The scores are cosines, whatever the embeddings' scale.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from_export.join("samples.json")).unwrap()).unwrap();
    for row in manifest.as_array().unwrap() {
        for key in ["clip_score", "clip_image_score"] {
            let v = row[key].as_f64().unwrap();
            assert!((-1.0..=1.0).contains(&v), "{key} {v} in {row}");
        }
    }
    // A CLIP whose text tower is not the pipeline's text encoder is refused, naming a tensor.
    let other = dir.join("other-clip");
    unclip_clip::load::write_random_run(&other, unclip_clip::load::TINY_CLIP_CONFIG, 9).unwrap();
    let err = run_fails(
        env!("CARGO_BIN_EXE_sample"),
        &[
            "--diffusers",
            pipeline_dir.to_str().unwrap(),
            "--clip",
            other.to_str().unwrap(),
            "--caption",
            "a red circle",
            "--out",
            dir.join("never2").to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("is not the pipeline's text_encoder") && err.contains("text_model."),
        "{err}"
    );
    // A raw prior in front of a decoder trained on normalised embeddings is refused, naming both.
    let err = run_fails(
        env!("CARGO_BIN_EXE_sample"),
        &[
            "--prior",
            prior.to_str().unwrap(),
            "--decoder",
            normalised_decoder.to_str().unwrap(),
            "--caption",
            "a red circle",
            "--out",
            dir.join("never").to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("samples raw embeddings (prior.clip_embeddings)")
            && err.contains("on normalized ones (decoder.clip_embeddings)"),
        "{err}"
    );
    assert!(!dir.join("never").exists());
}
