//! The prior's stage of the pipeline end to end through the binaries: shapes shards → `embed
//! --token-features` (a random tiny CLIP) → `train-prior` (either kind) → `train-prior --sample`;
//! and `--dry-run` on the paper configs.
mod common;
use common::{
    assert_same_tensors, dry_run_committed, dry_run_total, embedded_shapes, launch_two_ranks,
    launch_two_ranks_with, one_step_weights, pipeline_holding, prior_config_with, read_tensors,
    run, run_fails, AUTOREGRESSIVE_PRIOR, DIFFUSION_PRIOR,
};
use unclip_data::npy::NpyArray;

#[test]
fn embed_then_train_either_prior_then_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    embedded_shapes(dir, 32, env!("CARGO_BIN_EXE_embed"));
    // Each kind with a `--sampling` override of its own keys and what it prints for it.
    for (kind, section, sampling, shown) in [
        ("diffusion", DIFFUSION_PRIOR, "{steps: '4'}", "Ddim 4"),
        (
            "autoregressive",
            AUTOREGRESSIVE_PRIOR,
            "{temperature: 0.5}",
            "autoregressive, temperature 0.5",
        ),
    ] {
        let config = dir.join(format!("{kind}.yaml"));
        std::fs::write(&config, prior_config_with(dir, section)).unwrap();
        let run_dir = dir.join(kind);
        let prior = env!("CARGO_BIN_EXE_train-prior");
        let run_args = [
            "--config",
            config.to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
        ];
        let out = run(prior, &run_args);
        assert!(out.contains("cosine(z_t, true z_i) baseline"), "{out}");
        assert!(
            out.contains("guidance  2.0") || out.contains("guidance    2"),
            "{out}"
        );
        // Only the autoregressive prior has a codec whose round trip bounds its samples.
        assert_eq!(
            out.contains("through the codec"),
            kind == "autoregressive",
            "{out}"
        );
        assert!(run_dir
            .join("checkpoints/step-000000006/meta.json")
            .is_file());
        let npy = dir.join(format!("{kind}.npy"));
        let sample_args = [
            "--sample",
            "a red circle",
            "--sample",
            "two blue squares",
            "--candidates",
            "3",
            "--sampling",
            sampling,
            "--out",
            npy.to_str().unwrap(),
        ];
        let out = run(prior, &[&run_args[..], &sample_args[..]].concat());
        assert!(out.contains("\"a red circle\": z_i · z_t"), "{out}");
        assert!(out.contains(shown), "{out}");
        let z = NpyArray::from_bytes(&std::fs::read(&npy).unwrap()).unwrap();
        assert_eq!(z.shape, vec![2, 32]);
        for row in z.to_f32().chunks(32) {
            let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{kind}: embedding norm {norm}");
        }
    }
    diffusers_export_and_init_from(dir);
}

/// `--export-diffusers` writes the diffusion prior's EMA weights as a `PriorTransformer`
/// directory; `prior.init_from` starts a run from one (or from a pipeline directory's `prior/`):
/// its weights and its `clip_mean` / `clip_std`, kept although the run's own stats samples would
/// fit others. An lr of 1e-30 leaves the weights as they are, so the step-1 checkpoint holds them.
fn diffusers_export_and_init_from(dir: &std::path::Path) {
    let prior = env!("CARGO_BIN_EXE_train-prior");
    let config = dir.join("diffusion.yaml");
    let config_arg = config.to_str().unwrap();
    let run_dir = dir.join("diffusion");
    // The one --checkpoint picks, then the newest over it: its EMA weights, bit for bit; the
    // directory's other files are left alone and nothing is left beside it.
    let export = dir.join("prior-diffusers");
    std::fs::create_dir(&export).unwrap();
    std::fs::write(export.join("notes.txt"), "mine").unwrap();
    let step3 = run_dir.join("checkpoints/step-000000003");
    let step3_arg = step3.to_str().unwrap();
    for (picked, step) in [
        (Some(step3_arg), "step-000000003"),
        (None, "step-000000006"),
    ] {
        let mut args = vec![
            "--config",
            config_arg,
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--export-diffusers",
            export.to_str().unwrap(),
        ];
        args.extend(picked.map(|c| ["--checkpoint", c]).into_iter().flatten());
        let out = run(prior, &args);
        assert!(
            out.contains(step) && out.contains("PriorTransformer"),
            "{out}"
        );
        assert_same_tensors(
            &read_tensors(&export.join("diffusion_pytorch_model.safetensors")),
            &read_tensors(
                &run_dir
                    .join("checkpoints")
                    .join(step)
                    .join("ema.safetensors"),
            ),
            step,
        );
    }
    assert_eq!(
        std::fs::read_to_string(export.join("notes.txt")).unwrap(),
        "mine"
    );
    let beside: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
    let exported = read_tensors(&export.join("diffusion_pytorch_model.safetensors"));
    let loaded = unclip_prior::load::load_diffusers_prior(&export, tch::Device::Cpu).unwrap();
    assert_eq!(loaded.vs.variables().len(), exported.len());
    let pipeline = dir.join("pipeline");
    pipeline_holding(&export, &pipeline, "prior");
    for (name, from) in [("init-prior", &export), ("init-pipeline", &pipeline)] {
        let init = format!("prior.init_from={}", from.display());
        let sets = [init.as_str(), "data.stats_samples=5"];
        let (model, stderr) = one_step_weights(prior, &config, &dir.join(name), &sets);
        assert_same_tensors(&model, &exported, name);
        // The export of this data's run describes embeddings of its scale: no warning.
        assert!(!stderr.contains("RMS norm"), "{name}: {stderr}");
    }
    // A pretrained prior whose standardisation describes embeddings of another scale (Karlo's:
    // unnormalised) is warned about, and still loaded.
    let scaled = dir.join("prior-scaled");
    std::fs::create_dir_all(&scaled).unwrap();
    std::fs::copy(export.join("config.json"), scaled.join("config.json")).unwrap();
    let tensors: std::collections::HashMap<String, tch::Tensor> = exported
        .iter()
        .map(|(n, t)| {
            let t = if n == "clip_mean" || n == "clip_std" {
                t * 10.0
            } else {
                t.shallow_clone()
            };
            (n.clone(), t)
        })
        .collect();
    let named: Vec<(&String, &tch::Tensor)> = tensors.iter().collect();
    tch::Tensor::write_safetensors(&named, scaled.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let init = format!("prior.init_from={}", scaled.display());
    let (model, stderr) = one_step_weights(prior, &config, &dir.join("init-scaled"), &[&init]);
    assert!(stderr.contains("RMS norm"), "{stderr}");
    assert_same_tensors(&model, &tensors, "init-scaled");
    // Refused before any work: another model (the error prints the one that fits), the
    // autoregressive prior's export and init_from.
    let init = format!("prior.init_from={}", export.display());
    let bad_dir = dir.join("bad");
    let bad = run_fails(
        prior,
        &[
            "--config",
            config_arg,
            "--run-dir",
            bad_dir.to_str().unwrap(),
            "--set",
            &init,
            "--set",
            "prior.model.num_layers=2",
        ],
    );
    assert!(
        bad.contains("prior.init_from") && bad.contains("\"num_layers\":1"),
        "{bad}"
    );
    assert!(!bad_dir.exists());
    let ar_config = dir.join("autoregressive.yaml");
    let bad = run_fails(
        prior,
        &[
            "--config",
            ar_config.to_str().unwrap(),
            "--run-dir",
            dir.join("autoregressive").to_str().unwrap(),
            "--export-diffusers",
            dir.join("ar-diffusers").to_str().unwrap(),
        ],
    );
    assert!(bad.contains("autoregressive"), "{bad}");
    assert!(!dir.join("ar-diffusers").exists());
    let bad = run_fails(
        prior,
        &[
            "--config",
            ar_config.to_str().unwrap(),
            "--run-dir",
            bad_dir.to_str().unwrap(),
            "--set",
            &init,
        ],
    );
    assert!(bad.contains("prior.init_from"), "{bad}");
}

#[test]
fn dry_run_prints_the_paper_priors_sizes() {
    for (config, sizes) in [
        // 24 blocks of 12·2048² (attention + 4× MLP) plus projections and positions: about 1.2 B.
        ("configs/paper/prior.yaml", 1_200_000_000..1_230_000_000),
        // A 24 × 2048 caption encoder (1.21 B) and a 24 × 1664 causal decoder (0.80 B).
        ("configs/paper/prior-ar.yaml", 2_000_000_000..2_050_000_000),
    ] {
        let out = dry_run_committed(env!("CARGO_BIN_EXE_train-prior"), config);
        let total = dry_run_total(&out);
        assert!(sizes.contains(&total), "{config}: {total}");
    }
}

/// The autoregressive prior on two data-parallel ranks (Gloo): each rank reads its own shard and
/// fits the same codec; stopped at step 3 and resumed by both, it ends with the same weights and
/// EMA as the run that did not stop — also when the stopped run shards its optimiser state and
/// EMA (ZeRO-1), which changes none of the updates; so does a run that shards the gradients too
/// (ZeRO-2).
#[test]
fn two_ranks_train_the_autoregressive_prior_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    embedded_shapes(dir, 32, env!("CARGO_BIN_EXE_embed"));
    let config = dir.join("ar.yaml");
    std::fs::write(&config, prior_config_with(dir, AUTOREGRESSIVE_PRIOR)).unwrap();
    let bin = env!("CARGO_BIN_EXE_train-prior");
    let full = dir.join("full");
    let outputs = launch_two_ranks(bin, &config, &full, "6", false);
    for (rank, out) in outputs.iter().enumerate() {
        assert!(
            out.contains(&format!("epoch 0 done on rank {rank}: 16 samples")),
            "{out}"
        );
    }
    // Only rank 0 evaluates.
    assert!(outputs[0].contains("codec round trip") && !outputs[1].contains("codec round trip"));
    let split = dir.join("split");
    let zero = ["distributed.shard_optimizer=true"];
    launch_two_ranks_with(bin, &config, &split, "3", false, &zero);
    let outputs = launch_two_ranks_with(bin, &config, &split, "6", true, &zero);
    assert!(outputs[0].contains("ZeRO-1"), "{}", outputs[0]);
    // And with the averaged gradients sharded too (ZeRO-2), uninterrupted.
    let zero2 = dir.join("zero2");
    let sharded = [
        "distributed.shard_optimizer=true",
        "distributed.shard_gradients=true",
    ];
    let outputs = launch_two_ranks_with(bin, &config, &zero2, "6", false, &sharded);
    assert!(outputs[0].contains("ZeRO-2"), "{}", outputs[0]);
    for file in [
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
    ] {
        let read = |run: &std::path::Path| {
            std::fs::read(run.join("checkpoints/step-000000006").join(file)).unwrap()
        };
        assert!(read(&full) == read(&split), "{file} differs after resume");
        assert!(read(&full) == read(&zero2), "{file} differs under ZeRO-2");
    }
}
