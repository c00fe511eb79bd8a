//! Embedding shards: .npy round trips (and NumPy reads them), atomic shard writes, key alignment.
use std::path::Path;
use unclip_data::embeddings::{
    align_by_key, parse_embedding_sample, write_embedding_shard, EmbeddingSample,
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
    let cfg = ReaderConfig {
        shards: path.display().to_string(),
        rank: 0,
        world_size: 1,
        seed: 0,
        shard_shuffle: false,
        shuffle_buffer: 0,
    };
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
        align_by_key(&images, &keys(&["a", "c", "d"]), p).unwrap(),
        vec![Some(0), None, Some(1), Some(2)]
    );
    let err = align_by_key(&images, &keys(&["a", "z"]), p)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"z\"") && err.contains("emb/x.tar"), "{err}");
    let err = align_by_key(&images, &keys(&["b", "a"]), p)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"a\""), "{err}");
}
