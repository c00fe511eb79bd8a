//! Embedding shards: .npy round trips (and NumPy reads them), atomic shard writes, key alignment,
//! the normalised / raw convention check.
use std::path::Path;
use unclip_data::embeddings::{
    align_by_key, parse_embedding_sample, write_embedding_shard, ClipEmbeddings, EmbeddingSample,
};
use unclip_data::npy::{NpyArray, NpyData};
use unclip_data::reader::{ReaderConfig, ShardReader};

fn sample(i: usize, tokens: bool) -> EmbeddingSample {
    EmbeddingSample {
        key: format!("{i:06}"),
        caption: format!("caption {i} é"),
        image_emb: (0..8).map(|j| (i * 8 + j) as f32 * 0.25 - 3.0).collect(),
        text_emb: (0..8).map(|j| -((i + j) as f32) * 0.5).collect(),
        text_tokens: tokens.then(|| NpyArray {
            shape: vec![3, 4],
            data: NpyData::F16(
                (0..12)
                    .map(|v| half::f16::from_f32(v as f32 / 8.0))
                    .collect(),
            ),
        }),
    }
}

fn read(path: &Path) -> (Vec<EmbeddingSample>, u64) {
    let cfg = ReaderConfig::in_order(path.display().to_string());
    let r = ShardReader::with_parser(&cfg, 0, parse_embedding_sample).unwrap();
    let v = r.iter().collect();
    (v, r.skipped())
}

#[test]
fn npy_round_trips_and_rejects_junk() {
    let a = NpyArray::f32(vec![2, 3], vec![1.0, -2.5, 3.0, 0.0, 1e-8, 7.0]);
    let bytes = a.to_bytes();
    assert_eq!(bytes.len() % 16, (6 * 4) % 16, "header padded to 64 bytes");
    assert_eq!(NpyArray::from_bytes(&bytes).unwrap(), a);
    let v = NpyArray::f32(vec![5], vec![0.5; 5]);
    assert_eq!(NpyArray::from_bytes(&v.to_bytes()).unwrap(), v);
    assert!(NpyArray::from_bytes(b"junk").is_err());
    assert!(NpyArray::from_bytes(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn shards_round_trip_and_numpy_reads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("emb-000000.tar");
    let samples: Vec<_> = (0..5).map(|i| sample(i, i % 2 == 0)).collect();
    write_embedding_shard(&path, &samples).unwrap();
    assert!(!tmp.path().join("emb-000000.tar.partial").exists());
    let (back, skipped) = read(&path);
    assert_eq!((back, skipped), (samples.clone(), 0));

    let script = r#"
import sys, io, tarfile, numpy as np
with tarfile.open(sys.argv[1]) as tf:
    for m in tf.getmembers():
        if m.name.endswith(".npy"):
            a = np.load(io.BytesIO(tf.extractfile(m).read()))
            print(m.name, a.dtype, a.shape, float(a.sum()))
"#;
    let out = unclip_testkit::python(script, [path.to_str().unwrap()]);
    for s in &samples {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{}.img_emb.npy", s.key)))
            .unwrap();
        let sum: f32 = s.image_emb.iter().sum();
        assert!(line.contains("float32 (8,)"), "{line}");
        let got: f32 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((got - sum).abs() < 1e-4, "{line} vs {sum}");
    }
    assert!(
        out.contains("000000.txt_tokens.npy float16 (3, 4)"),
        "{out}"
    );
}

#[test]
fn malformed_embedding_samples_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("emb-000000.tar");
    let mut w = webdataset::TarWriter::create(path.to_str().unwrap()).unwrap();
    let good = sample(0, false);
    let npy = |v: &[f32]| NpyArray::f32(vec![v.len()], v.to_vec()).to_bytes();
    for (key, img, txt) in [
        ("good", npy(&good.image_emb), npy(&good.text_emb)),
        ("junk", b"not npy".to_vec(), npy(&good.text_emb)),
        ("mismatch", npy(&good.image_emb), npy(&good.text_emb[..4])),
    ] {
        let mut s = webdataset::Sample::with_key(key);
        s.insert("img_emb.npy", webdataset::Value::Bytes(img.into()));
        s.insert("txt_emb.npy", webdataset::Value::Bytes(txt.into()));
        s.insert("txt", webdataset::Value::Bytes(b"c".to_vec().into()));
        w.write(&s).unwrap();
    }
    w.close().unwrap();
    let (back, skipped) = read(&path);
    assert_eq!(back.len(), 1);
    assert_eq!(skipped, 2);
}

#[test]
fn keys_align_as_a_subsequence_or_fail_naming_the_key() {
    let keys = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let images = keys(&["a", "b", "c", "d"]);
    let p = Path::new("emb/x.tar");
    assert_eq!(
        align_by_key(&images, &keys(&["a", "c", "d"]), p, false).unwrap(),
        vec![Some(0), None, Some(1), Some(2)]
    );
    let err = align_by_key(&images, &keys(&["a", "z"]), p, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"z\"") && err.contains("emb/x.tar"), "{err}");
    let err = align_by_key(&images, &keys(&["b", "a"]), p, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"b\""), "out of order: {err}");
    // Image "b" unreadable this time: its embedding is passed over only when the image shard
    // reported read errors, which explain it.
    let read = keys(&["a", "c", "d"]);
    let all = keys(&["a", "b", "c", "d"]);
    assert_eq!(
        align_by_key(&read, &all, p, true).unwrap(),
        vec![Some(0), Some(2), Some(3)]
    );
    let err = align_by_key(&read, &all, p, false).unwrap_err().to_string();
    assert!(err.contains("\"b\""), "{err}");
    assert!(align_by_key(&keys(&["a", "b"]), &keys(&["a", "b", "x"]), p, true).is_ok());
    let err = align_by_key(&read, &keys(&["c", "a"]), p, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"c\""), "out of order even so: {err}");
}

mod paired {
    use super::*;
    use unclip_data::images::ImageTransform;
    use unclip_data::loader::{DataPosition, ImageLoader, LoaderConfig};
    use unclip_data::shards::{write_shapes_shards, ShapesSpec};

    fn image_keys(shard: &Path) -> Vec<String> {
        let cfg = ReaderConfig::in_order(shard.display().to_string());
        ShardReader::new(&cfg, 0)
            .unwrap()
            .iter()
            .map(|s| s.key)
            .collect()
    }

    /// Two image shards of 5 and their embedding shards (embedding = the key's number); the second
    /// embedding shard lacks one key. `stray` adds a key no image has to the first.
    fn dataset(dir: &Path, stray: bool) -> (String, std::path::PathBuf) {
        write_shapes_shards(&ShapesSpec {
            count: 10,
            resolution: 32,
            seed: 2,
            shard_size: 5,
            out: dir.join("img"),
            prefix: "train".into(),
        })
        .unwrap();
        let emb = dir.join("emb");
        std::fs::create_dir_all(&emb).unwrap();
        for (i, name) in ["train-000000.tar", "train-000001.tar"].iter().enumerate() {
            let mut keys = image_keys(&dir.join("img").join(name));
            if i == 1 {
                keys.remove(2);
            }
            if stray && i == 0 {
                keys.push("zzz".into());
            }
            let samples: Vec<EmbeddingSample> = keys
                .iter()
                .map(|k| {
                    let v = k.parse::<f32>().unwrap_or(-1.0);
                    EmbeddingSample {
                        key: k.clone(),
                        caption: "c".into(),
                        image_emb: vec![v; 4],
                        text_emb: vec![-v; 4],
                        text_tokens: None,
                    }
                })
                .collect();
            write_embedding_shard(&emb.join(name), &samples).unwrap();
        }
        (
            format!("{}/img/train-{{000000..000001}}.tar", dir.display()),
            emb,
        )
    }

    fn config(shards: String, emb: std::path::PathBuf) -> LoaderConfig {
        LoaderConfig {
            reader: ReaderConfig {
                shards,
                rank: 0,
                world_size: 1,
                seed: 4,
                shard_shuffle: false,
                shuffle_buffer: 3,
            },
            transform: ImageTransform {
                resolution: 16,
                ..Default::default()
            },
            batch_size: 3,
            prefetch: 1,
            start: DataPosition::default(),
            embeddings: Some(emb),
            workers: 1,
        }
    }

    #[test]
    fn images_come_with_their_own_embeddings() {
        let tmp = tempfile::tempdir().unwrap();
        let (shards, emb) = dataset(tmp.path(), false);
        let take = |start| {
            let mut cfg = config(shards.clone(), emb.clone());
            cfg.start = start;
            let mut l = ImageLoader::start(cfg).unwrap();
            (0..6).map(|_| l.next_batch().unwrap()).collect::<Vec<_>>()
        };
        let batches = take(DataPosition::default());
        let mut epoch0 = std::collections::BTreeSet::new();
        for b in &batches {
            assert_eq!(b.embeddings.len(), b.len());
            for (row, key) in b.keys.iter().enumerate() {
                let v: f32 = key.parse().unwrap();
                let e = &b.embeddings[row];
                assert_eq!(e.image_emb, [v; 4]);
                assert_eq!(e.text_emb[0], -v);
                assert_eq!(&e.key, key, "the record travels with its image");
            }
        }
        for b in &batches[..3] {
            epoch0.extend(b.keys.iter().cloned());
        }
        assert_eq!(epoch0.len(), 9, "9 of 10 images have embeddings");
        let r = batches[3]
            .finished_epochs
            .first()
            .cloned()
            .or(batches[2].finished_epochs.first().cloned())
            .unwrap();
        assert_eq!((r.samples, r.skipped_read), (9, 1));
        // Resuming mid-stream continues with the same pairs.
        let resumed = take(batches[1].position);
        for (a, b) in batches[2..].iter().zip(&resumed) {
            assert_eq!((&a.keys, &a.embeddings), (&b.keys, &b.embeddings));
        }
    }

    /// Every image of one epoch's batches, checked against its own embedding, with the report.
    fn one_epoch(cfg: LoaderConfig) -> (Vec<String>, unclip_data::loader::EpochReport) {
        let mut loader = ImageLoader::start(cfg).unwrap();
        let mut keys = Vec::new();
        loop {
            let b = loader.next_batch().unwrap();
            if let Some(r) = b.finished_epochs.first() {
                return (keys, r.clone());
            }
            for (key, e) in b.keys.iter().zip(&b.embeddings) {
                assert_eq!(e.image_emb, [key.parse::<f32>().unwrap(); 4]);
                keys.push(key.clone());
            }
        }
    }

    #[test]
    fn streamed_or_cut_short_shards_keep_their_embeddings() {
        let tmp = tempfile::tempdir().unwrap();
        let (shards, emb) = dataset(tmp.path(), false);
        let local = one_epoch(config(shards.clone(), emb.clone()));
        // Streamed through a command, each shard still finds its embedding shard by name; and
        // the embedding shards stream too, from a URL prefix or a command template.
        let piped = one_epoch(config(format!("pipe:cat {shards}"), emb.clone()));
        assert_eq!(piped.0.len(), 9);
        assert_eq!(piped, local);
        for streamed in [
            format!("file://{}", emb.display()),
            format!("pipe:cat {}/{{}}", emb.display()),
        ] {
            let got = one_epoch(config(
                format!("pipe:cat {shards}"),
                streamed.clone().into(),
            ));
            assert_eq!(got, local, "{streamed}");
        }
        // A wrong embedding location fails at the start, naming what could not be read.
        let wrong = format!("pipe:cat {}/nothing/{{}}", tmp.path().display());
        let err = ImageLoader::start(config(shards.clone(), wrong.into()))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("no sample of the first shard pair could be read")
                && err.contains("nothing/train-000000.tar"),
            "{err}"
        );
        // The first image shard cut short, as a dropped download leaves it: its readable images
        // keep their embeddings, the lost ones are skipped and the error names the shard.
        let first = tmp.path().join("img/train-000000.tar");
        let bytes = std::fs::read(&first).unwrap();
        std::fs::write(&first, &bytes[..bytes.len() * 2 / 5]).unwrap();
        let (keys, report) = one_epoch(config(shards, emb));
        assert!((4..9).contains(&keys.len()), "{keys:?}");
        assert!(report.skipped_read >= 1, "{report:?}");
        assert!(
            report
                .read_errors
                .iter()
                .any(|e| e.contains("train-000000.tar")),
            "{report:?}"
        );
    }

    #[test]
    fn shards_that_do_not_belong_together_fail_before_training() {
        let tmp = tempfile::tempdir().unwrap();
        let (shards, emb) = dataset(tmp.path(), true);
        let err = ImageLoader::start(config(shards.clone(), emb.clone()))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("\"zzz\"") && err.contains("train-000000.tar"),
            "{err}"
        );
        std::fs::remove_file(emb.join("train-000001.tar")).unwrap();
        let err = ImageLoader::start(config(shards, emb))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("train-000001.tar") && err.contains("not found"),
            "{err}"
        );
    }
}

/// `v` scaled to norm `n`.
fn with_norm(v: &[f32], n: f64) -> Vec<f32> {
    let len = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|&x| (f64::from(x) * n / len) as f32).collect()
}

#[test]
fn the_convention_check_tells_normalised_from_raw_embeddings() {
    let raw: Vec<EmbeddingSample> = (0..4).map(|i| sample(i, false)).collect();
    let unit: Vec<EmbeddingSample> = raw
        .iter()
        .map(|s| EmbeddingSample {
            image_emb: with_norm(&s.image_emb, 1.0),
            text_emb: with_norm(&s.text_emb, 1.0),
            ..s.clone()
        })
        .collect();
    let key = "prior.clip_embeddings";
    ClipEmbeddings::Normalized.check(&unit, key).unwrap();
    ClipEmbeddings::Raw.check(&raw, key).unwrap();
    // One raw text embedding that happens to have norm 1 is still raw data.
    let mut near = raw.clone();
    near[0].text_emb = with_norm(&near[0].text_emb, 1.0);
    ClipEmbeddings::Raw.check(&near, key).unwrap();
    let err = ClipEmbeddings::Raw.check(&unit, key).unwrap_err();
    assert!(err.contains("L2-normalised") && err.contains(key), "{err}");
    // A single stray sample among normalised ones is named, with its norm.
    let mut mixed = unit.clone();
    mixed[2].image_emb = with_norm(&mixed[2].image_emb, 7.5);
    let err = ClipEmbeddings::Normalized.check(&mixed, key).unwrap_err();
    assert!(
        err.contains("sample 000002") && err.contains("image embedding has norm 7.5000"),
        "{err}"
    );
    assert!(err.contains(&format!("{key}: raw")), "{err}");
    assert_eq!(
        serde_json::from_str::<ClipEmbeddings>("\"raw\"").unwrap(),
        ClipEmbeddings::Raw
    );
    assert_eq!(ClipEmbeddings::default(), ClipEmbeddings::Normalized);
}
