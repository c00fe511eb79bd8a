//! Reading shards: brace expansion, rank splits, seeded shuffles, bad samples skipped and counted,
//! shards written by Python's webdataset, and shards streamed from URLs and commands.
use std::collections::BTreeSet;
use std::path::Path;
use unclip_data::reader::{
    rank_shards, shard_list, shard_name, CaptionedImage, ReaderConfig, ShardReader,
};
use unclip_data::shapes::make_sample;
use unclip_data::shards::{write_shapes_shards, ShapesSpec};
use webdataset::{Sample, TarWriter, Value};

fn shapes(dir: &Path, count: u64) -> String {
    let spec = ShapesSpec {
        count,
        resolution: 32,
        seed: 4,
        shard_size: 10,
        out: dir.into(),
        prefix: "train".into(),
    };
    let n = write_shapes_shards(&spec).unwrap().len();
    format!("{}/train-{{000000..{:06}}}.tar", dir.display(), n - 1)
}

fn config(shards: String) -> ReaderConfig {
    ReaderConfig {
        shards,
        rank: 0,
        world_size: 1,
        seed: 1,
        shard_shuffle: true,
        shuffle_buffer: 8,
    }
}

#[test]
fn reads_every_sample_in_a_seeded_shuffled_order() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(shapes(tmp.path(), 35));
    let read = |epoch| {
        ShardReader::new(&cfg, epoch)
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
    };
    let (a, b, c) = (read(0), read(0), read(1));
    assert_eq!(a.len(), 35);
    let keys = |v: &[unclip_data::reader::CaptionedImage]| {
        v.iter().map(|s| s.key.clone()).collect::<Vec<_>>()
    };
    assert_eq!(keys(&a), keys(&b), "same seed and epoch: same order");
    assert_ne!(keys(&a), keys(&c), "another epoch: another order");
    assert_ne!(
        keys(&a),
        (0..35).map(|i| format!("{i:09}")).collect::<Vec<_>>(),
        "shuffled"
    );
    for s in &a {
        let want = make_sample(4, s.key.parse().unwrap(), 32).unwrap();
        assert_eq!(
            (&s.caption, &s.image, s.image_ext.as_str()),
            (&want.caption, &want.png, "png")
        );
        assert_eq!(
            s.metadata.as_ref().unwrap()["objects"]
                .as_array()
                .unwrap()
                .len(),
            want.scene.objects.len()
        );
    }
}

#[test]
fn ranks_read_disjoint_shards_covering_the_set() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = shapes(tmp.path(), 30);
    let all = shard_list(&pattern).unwrap();
    let mut seen = BTreeSet::new();
    for rank in 0..3 {
        let cfg = ReaderConfig {
            rank,
            world_size: 3,
            ..config(pattern.clone())
        };
        assert_eq!(rank_shards(&all, rank, 3).unwrap(), vec![all[rank].clone()]);
        for s in ShardReader::new(&cfg, 0).unwrap().iter() {
            assert!(seen.insert(s.key), "a sample read by two ranks");
        }
    }
    assert_eq!(seen.len(), 30);
    let err = rank_shards(&all, 0, 4).unwrap_err().to_string();
    assert!(
        err.contains("3 shards cannot be split over 4 ranks"),
        "{err}"
    );
}

#[test]
fn missing_shards_and_empty_lists_fail_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = format!("{}/train-{{000000..000002}}.tar", tmp.path().display());
    shapes(tmp.path(), 20); // two shards: 000002 is missing
    let err = ShardReader::new(&config(pattern), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("train-000002.tar") && err.contains("shard not found"),
        "{err}"
    );
    let err = shard_list("").unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn bad_samples_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let good = make_sample(0, 0, 32).unwrap();
    let path = tmp.path().join("bad-000000.tar");
    let mut w = TarWriter::create(path.to_str().unwrap()).unwrap();
    let mut add = |key: &str, fields: Vec<(&str, Value)>| {
        let mut s = Sample::with_key(key);
        for (k, v) in fields {
            s.insert(k, v);
        }
        w.write(&s).unwrap();
    };
    add(
        "ok1",
        vec![
            ("png", Value::Bytes(good.png.clone().into())),
            ("txt", Value::Bytes(b"a red circle".to_vec().into())),
        ],
    );
    add(
        "nocaption",
        vec![("png", Value::Bytes(good.png.clone().into()))],
    );
    add(
        "noimage",
        vec![("txt", Value::Bytes(b"a caption".to_vec().into()))],
    );
    add(
        "latin1",
        vec![
            ("png", Value::Bytes(good.png.clone().into())),
            ("txt", Value::Bytes(vec![0x63, 0x61, 0x66, 0xe9].into())),
        ],
    );
    add(
        "ok2",
        vec![
            ("jpg", Value::Bytes(vec![0xff, 0xd8, 0xff].into())),
            ("txt", Value::Bytes(b"two".to_vec().into())),
        ],
    );
    w.close().unwrap();
    // A truncated copy of a good shard: its readable samples come through, the cut is counted.
    let full = std::fs::read(&path).unwrap();
    std::fs::write(
        tmp.path().join("bad-000001.tar"),
        &full[..full.len() / 2 + 100],
    )
    .unwrap();

    let cfg = ReaderConfig {
        shard_shuffle: false,
        shuffle_buffer: 0,
        ..config(format!(
            "{}/bad-{{000000..000001}}.tar",
            tmp.path().display()
        ))
    };
    let reader = ShardReader::new(&cfg, 0).unwrap();
    let keys: Vec<String> = reader.iter().map(|s| s.key).collect();
    assert_eq!(&keys[..2], &["ok1", "ok2"]);
    assert!(
        keys[2..].iter().all(|k| k == "ok1" || k == "ok2"),
        "{keys:?}"
    );
    assert!(
        reader.skipped() >= 4,
        "3 bad samples + the truncated shard: {}",
        reader.skipped()
    );
}

#[test]
fn shards_written_by_python_webdataset_load() {
    let tmp = tempfile::tempdir().unwrap();
    // The img2dataset layout: KEY.jpg, KEY.txt, KEY.json.
    let script = r#"
import json, sys
import webdataset as wds
with wds.ShardWriter(sys.argv[1] + "/py-%06d.tar", maxcount=4) as sink:
    for i in range(10):
        sink.write({"__key__": f"{i:09d}", "jpg": bytes([0xff, 0xd8, i]), "txt": f"caption {i} ✓",
                    "json": json.dumps({"url": f"https://example/{i}", "width": 64}).encode()})
"#;
    unclip_testkit::python(script, [tmp.path()]);
    let cfg = ReaderConfig {
        shard_shuffle: false,
        shuffle_buffer: 0,
        ..config(format!(
            "{}/py-{{000000..000002}}.tar",
            tmp.path().display()
        ))
    };
    let reader = ShardReader::new(&cfg, 0).unwrap();
    let samples: Vec<_> = reader.iter().collect();
    assert_eq!(samples.len(), 10);
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s.key, format!("{i:09}"));
        assert_eq!(
            (s.image.as_slice(), s.image_ext.as_str()),
            (&[0xff, 0xd8, i as u8][..], "jpg")
        );
        assert_eq!(s.caption, format!("caption {i} ✓"));
        assert_eq!(s.metadata.as_ref().unwrap()["width"], 64);
    }
    assert_eq!(reader.skipped(), 0);
}

/// Every sample of `pattern` in file order, what was skipped and the first read errors.
fn read_in_order(pattern: String) -> (Vec<CaptionedImage>, u64, Vec<String>) {
    let reader = ShardReader::new(&ReaderConfig::in_order(pattern), 0).unwrap();
    let samples: Vec<_> = reader.iter().collect();
    (samples, reader.skipped(), reader.errors())
}

#[test]
fn remote_shards_stream_through_pipe_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let local = shapes(tmp.path(), 35);
    let (want, _, _) = read_in_order(local.clone());
    for pattern in [format!("pipe:cat {local}"), format!("file://{local}")] {
        let (got, skipped, errors) = read_in_order(pattern.clone());
        assert_eq!(got, want, "{pattern}");
        assert_eq!((skipped, errors.len()), (0, 0), "{pattern}: {errors:?}");
    }
    // A shard whose command fails is skipped and reported by its URL; the others are read.
    let dir = tmp.path().display();
    let failing = format!("pipe:cat {dir}/{{train-000000,gone-000000,train-000001}}.tar");
    let (got, skipped, errors) = read_in_order(failing);
    assert_eq!(got.len(), 20, "the two readable shards");
    assert_eq!(skipped, 1);
    assert!(
        errors.len() == 1 && errors[0].contains(&format!("pipe:cat {dir}/gone-000000.tar")),
        "{errors:?}"
    );
}

#[test]
fn urls_are_checked_for_a_reader_and_named_by_their_file() {
    // No local check is possible for a URL, but a scheme nothing reads fails before any work.
    let err = shard_list("s3://bucket/train-{000000..000001}.tar")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("s3://bucket/train-000000.tar")
            && err.contains("no reader for s3:")
            && err.contains("pipe:"),
        "{err}"
    );
    let urls = shard_list("https://host/data/train-{000000..000001}.tar?download=1").unwrap();
    assert_eq!(urls.len(), 2);
    for (shard, name) in [
        (
            "https://host/data/train-000001.tar?download=1",
            "train-000001.tar",
        ),
        ("pipe:aws s3 cp s3://bucket/laion/00042.tar -", "00042.tar"),
        (
            "pipe:curl -s -L 'https://host/x/train-000007.tar'",
            "train-000007.tar",
        ),
        ("file:///data/shards/a-000000.tar", "a-000000.tar"),
        (
            "pipe:gsutil cat gs://b/imagenet-000012.tgz",
            "imagenet-000012.tgz",
        ),
        ("data/shapes/clip64-000003.tar", "clip64-000003.tar"),
    ] {
        assert_eq!(shard_name(Path::new(shard)).unwrap(), name, "{shard}");
    }
    let err = shard_name(Path::new("pipe:generate-shards --seed 3"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pipe:generate-shards") && err.contains(".tar"),
        "{err}"
    );
}

/// Serves the files of `dir` over HTTP/1.0 on a free local port (404 for anything else) until the
/// test ends; returns its base URL.
fn serve(dir: &Path) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut request = String::new();
                reader.read_line(&mut request).unwrap_or_default();
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                let file = dir.join(path.trim_start_matches('/'));
                let mut out = &stream;
                match std::fs::read(&file) {
                    Ok(body) => {
                        let head =
                            format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                        let _ = out
                            .write_all(head.as_bytes())
                            .and_then(|()| out.write_all(&body));
                    }
                    Err(_) => {
                        let _ =
                            out.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    }
                }
            });
        }
    });
    base
}

#[test]
fn shards_stream_over_http_through_curl() {
    let tmp = tempfile::tempdir().unwrap();
    let local = shapes(tmp.path(), 30);
    let base = serve(tmp.path());
    let (want, _, _) = read_in_order(local);
    let (got, _, errors) = read_in_order(format!("{base}/train-{{000000..000002}}.tar"));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(got, want);
    // A shard the server does not have (404: curl fails at once) is skipped and named.
    let (got, _, errors) = read_in_order(format!("{base}/train-{{000000,000009,000001}}.tar"));
    assert_eq!(got.len(), 20);
    assert!(
        errors.len() == 1 && errors[0].contains(&format!("{base}/train-000009.tar")),
        "{errors:?}"
    );
}
