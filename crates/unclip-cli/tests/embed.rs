//! `embed` end to end: a CLIP run directory → embedding shards with the image shards' names and
//! keys, normalised embeddings equal to the model's, token features, skips counted, resumable,
//! streamed shards.
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Tensor};
use unclip_clip::load::load_clip;
use unclip_data::embeddings::{parse_embedding_sample, EmbeddingSample};
use unclip_data::reader::{ReaderConfig, ShardReader};
use unclip_data::shapes::make_sample;
use unclip_data::shards::{write_shapes_shards, ShapesSpec};
use unclip_data::tokenizer::ClipTokenizer;

const CONFIG: &str = "
seed: 0
device: cpu
model:
  embed_dim: 16
  vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}
  text: {context_length: 24, width: 32, layers: 1, heads: 2}
data:
  train: {shards: unused-000000.tar}
  held_out: {shards: unused-000000.tar}
  image: {resolution: 32}
";

/// A temporary directory with `run/` (one checkpoint of a randomly initialised tiny CLIP) and
/// `data/img-NNNNNN.tar` (`count` shapes samples, 6 a shard).
fn fixture(count: u64, seed: u64) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    unclip_clip::load::write_random_run(&run, CONFIG, 1).unwrap();
    let data = tmp.path().join("data");
    write_shapes_shards(&ShapesSpec {
        count,
        resolution: 32,
        seed,
        shard_size: 6,
        out: data.clone(),
        prefix: "img".into(),
    })
    .unwrap();
    (tmp, run, data)
}

/// An embedding shard's samples, in order.
fn read_embeddings(shard: &Path) -> Vec<EmbeddingSample> {
    let cfg = ReaderConfig::in_order(shard.display().to_string());
    ShardReader::with_parser(&cfg, 0, parse_embedding_sample)
        .unwrap()
        .iter()
        .collect()
}

fn embed(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_embed"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn embeds_shards_resumably_with_the_models_embeddings() {
    let (tmp, run, data) = fixture(12, 5);
    // A third shard with an undecodable image.
    let bad = data.join("img-000002.tar");
    let mut w = webdataset::TarWriter::create(bad.to_str().unwrap()).unwrap();
    for (key, png) in [
        ("x0", make_sample(5, 99, 32).unwrap().png),
        ("x1", b"junk".to_vec()),
    ] {
        let mut s = webdataset::Sample::with_key(key);
        s.insert("png", webdataset::Value::Bytes(png.into()));
        s.insert(
            "txt",
            webdataset::Value::Bytes(b"a red circle".to_vec().into()),
        );
        w.write(&s).unwrap();
    }
    w.close().unwrap();
    let out = tmp.path().join("emb");
    let shards = format!("{}/img-{{000000..000002}}.tar", data.display());
    let args = [
        "--clip",
        run.to_str().unwrap(),
        "--shards",
        &shards,
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "4",
        "--token-features",
        "--device",
        "cpu",
    ];
    let report = embed(&args);
    assert!(
        report.contains("wrote 3 embedding shards")
            && report.contains("13 samples embedded, 1 skipped"),
        "{report}"
    );

    let clip = load_clip(&run, Device::Cpu).unwrap();
    let tok = ClipTokenizer::new();
    for shard in ["img-000000.tar", "img-000001.tar", "img-000002.tar"] {
        let cfg = ReaderConfig::in_order(data.join(shard).display().to_string());
        let images: Vec<_> = ShardReader::new(&cfg, 0).unwrap().iter().collect();
        let embs = read_embeddings(&out.join(shard));
        let want_keys: Vec<&str> = images
            .iter()
            .map(|s| s.key.as_str())
            .filter(|k| *k != "x1")
            .collect();
        let got_keys: Vec<&str> = embs.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(got_keys, want_keys, "{shard}");
        for e in &embs {
            let img = images.iter().find(|s| s.key == e.key).unwrap();
            assert_eq!(e.caption, img.caption);
            // The model's own embedding of this sample, normalised.
            let mut px = vec![0f32; clip.image.numel()];
            let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
            clip.image.apply(&img.image, &mut rng, &mut px).unwrap();
            let want = tch::no_grad(|| {
                clip.model
                    .encode_image(&Tensor::from_slice(&px).view([1, 3, 32, 32]))
                    .unwrap()
            });
            let want = &want / want.norm();
            let got = Tensor::from_slice(&e.image_emb).view([1, 16]);
            assert!((got - want).abs().max().double_value(&[]) < 1e-5);
            let norm: f32 = e.text_emb.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4);
            let tokens = e.text_tokens.as_ref().unwrap();
            let n = tok.encode(&e.caption).len() + 2;
            assert_eq!(tokens.shape, vec![n, 32], "tokens up to the end token");
        }
    }
    // A rerun skips every finished shard.
    let again = embed(&args);
    assert!(
        again.contains("wrote 0 embedding shards") && again.contains("(3 already there)"),
        "{again}"
    );
}

fn strs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

fn run_embed_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_embed"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "embed {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn raw_embeddings_are_the_projections_and_never_mix_with_normalised_ones() {
    let (tmp, run, data) = fixture(6, 7);
    let shards = format!("{}/img-000000.tar", data.display());
    let args = |out: &Path, raw: bool| {
        let mut a = vec![
            "--clip".to_string(),
            run.display().to_string(),
            "--shards".into(),
            shards.clone(),
            "--out".into(),
            out.display().to_string(),
            "--device".into(),
            "cpu".into(),
        ];
        if raw {
            a.push("--raw".into());
        }
        a
    };
    let (normalised, raw) = (tmp.path().join("emb"), tmp.path().join("emb-raw"));
    embed(&strs(&args(&normalised, false)));
    embed(&strs(&args(&raw, true)));
    let read = |dir: &Path| read_embeddings(&dir.join("img-000000.tar"));
    let (unit, as_is) = (read(&normalised), read(&raw));
    assert_eq!(unit.len(), 6);
    let clip = load_clip(&run, Device::Cpu).unwrap();
    let images: Vec<_> = ShardReader::new(&ReaderConfig::in_order(shards.clone()), 0)
        .unwrap()
        .iter()
        .collect();
    let tok = ClipTokenizer::new();
    let row = |v: &[f32]| Tensor::from_slice(v).view([1, 16]);
    let max_diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    for ((u, r), img) in unit.iter().zip(&as_is).zip(&images) {
        assert_eq!((&u.key, &r.key), (&img.key, &img.key));
        // The raw z_i is the image projection itself, and normalising it gives the stored one.
        let mut px = vec![0f32; clip.image.numel()];
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        clip.image.apply(&img.image, &mut rng, &mut px).unwrap();
        let ids =
            Tensor::from_slice(&tok.tokenize_batch(&[img.caption.as_str()], 24)).view([1, 24]);
        let (z_i, z_t) = tch::no_grad(|| {
            let z_i = clip
                .model
                .encode_image(&Tensor::from_slice(&px).view([1, 3, 32, 32]))
                .unwrap();
            (z_i, clip.model.encode_text(&ids).unwrap().embeds)
        });
        assert!(max_diff(&row(&r.image_emb), &z_i) < 1e-5);
        assert!(max_diff(&row(&r.text_emb), &z_t) < 1e-5);
        for (raw_v, unit_v) in [(&r.image_emb, &u.image_emb), (&r.text_emb, &u.text_emb)] {
            let raw_v = row(raw_v);
            assert!((raw_v.norm().double_value(&[]) - 1.0).abs() > 1e-2);
            assert!(max_diff(&(&raw_v / raw_v.norm()), &row(unit_v)) < 1e-5);
        }
    }
    // Resuming into a directory of the other convention is refused before anything is written.
    let err = run_embed_fails(&strs(&args(&normalised, true)));
    assert!(
        err.contains("img-000000.tar") && err.contains("holds L2-normalised embeddings"),
        "{err}"
    );
    let err = run_embed_fails(&strs(&args(&raw, false)));
    assert!(err.contains("holds raw embeddings"), "{err}");
}

#[test]
fn streamed_shards_embed_as_local_ones_and_a_failed_one_is_left_for_a_rerun() {
    let (tmp, run, data) = fixture(12, 3);
    // Shard 000001 is not there yet: its command fails, as a download would.
    let later = tmp.path().join("img-000001.tar");
    std::fs::rename(data.join("img-000001.tar"), &later).unwrap();
    let (local, streamed) = (tmp.path().join("emb"), tmp.path().join("emb-pipe"));
    let args = |shards: String, out: &Path| {
        vec![
            "--clip".to_string(),
            run.display().to_string(),
            "--shards".into(),
            shards,
            "--out".into(),
            out.display().to_string(),
            "--device".into(),
            "cpu".into(),
        ]
    };
    let pipe = format!("pipe:cat {}/img-{{000000..000001}}.tar", data.display());
    let err = run_embed_fails(&strs(&args(pipe.clone(), Path::new("https://host/emb"))));
    assert!(
        err.contains("--out https://host/emb") && err.contains("local"),
        "{err}"
    );
    let err = run_embed_fails(&strs(&args(pipe.clone(), &streamed)));
    assert!(
        err.contains("1 shards could not be read")
            && err.contains(&format!("pipe:cat {}/img-000001.tar", data.display()))
            && err.contains("rerun"),
        "{err}"
    );
    assert!(streamed.join("img-000000.tar").is_file());
    assert!(!streamed.join("img-000001.tar").exists(), "not written");
    // Once the shard is there, the same command embeds it and keeps the first.
    std::fs::rename(&later, data.join("img-000001.tar")).unwrap();
    let report = embed(&strs(&args(pipe, &streamed)));
    assert!(
        report.contains("wrote 1 embedding shards") && report.contains("(1 already there)"),
        "{report}"
    );
    embed(&strs(&args(
        format!("{}/img-{{000000..000001}}.tar", data.display()),
        &local,
    )));
    for shard in ["img-000000.tar", "img-000001.tar"] {
        let (a, b) = (
            read_embeddings(&local.join(shard)),
            read_embeddings(&streamed.join(shard)),
        );
        assert_eq!(a.len(), 6);
        assert_eq!(a, b, "{shard}: streamed = local");
    }
}
