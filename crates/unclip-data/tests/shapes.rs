//! The shapes dataset: deterministic, pixels agree with the scene JSON, captions name what is
//! drawn, and shards load in Python's webdataset with the same keys and bytes.
use unclip_data::shapes::{caption, make_sample, relation, render, sample_rng, Scene};
use unclip_data::shards::{write_shapes_shards, ShapesSpec};

#[test]
fn samples_are_deterministic_and_independent_of_order() {
    let a = make_sample(7, 123, 64).unwrap();
    let b = make_sample(7, 123, 64).unwrap();
    assert_eq!(
        (a.scene.clone(), a.caption.clone(), a.png.clone()),
        (b.scene, b.caption, b.png)
    );
    assert_ne!(
        make_sample(8, 123, 64).unwrap().png,
        a.png,
        "the seed matters"
    );
    assert_ne!(
        make_sample(7, 124, 64).unwrap().png,
        a.png,
        "the index matters"
    );
}

#[test]
fn pixels_match_the_scene() {
    let mut blended = 0;
    for i in 0..300 {
        let mut rng = sample_rng(1, i);
        let scene = Scene::sample(&mut rng);
        assert!((1..=3).contains(&scene.objects.len()));
        for res in [32u32, 64, 200] {
            let img = render(&scene, res);
            let at = |x: f32, y: f32| {
                img.get_pixel(
                    ((x * res as f32) as u32).min(res - 1),
                    ((y * res as f32) as u32).min(res - 1),
                )
                .0
            };
            for o in &scene.objects {
                assert_eq!(
                    at(o.centre[0], o.centre[1]),
                    o.rgb,
                    "sample {i} at {res}px: centre of {o:?}"
                );
                assert!(
                    o.centre
                        .iter()
                        .all(|c| *c - o.radius > 0.0 && *c + o.radius < 1.0),
                    "inside the image"
                );
            }
            // A pixel outside every object's circumcircle shows the background.
            for (x, y) in [(0.01f32, 0.01f32), (0.99, 0.01), (0.01, 0.99), (0.99, 0.99)] {
                let clear = scene.objects.iter().all(|o| {
                    ((o.centre[0] - x).powi(2) + (o.centre[1] - y).powi(2)).sqrt()
                        > o.radius + 2.0 / res as f32
                });
                if clear {
                    assert_eq!(
                        at(x, y),
                        scene.background_rgb,
                        "sample {i}: corner ({x}, {y})"
                    );
                }
            }
            let colours: Vec<[u8; 3]> = scene
                .objects
                .iter()
                .map(|o| o.rgb)
                .chain([scene.background_rgb])
                .collect();
            blended += img.pixels().filter(|p| !colours.contains(&p.0)).count();
        }
    }
    assert!(blended > 0, "edges are anti-aliased");
}

#[test]
fn captions_name_every_object_and_true_relations() {
    let mut relations = 0;
    for i in 0..2000 {
        let mut rng = sample_rng(3, i);
        let scene = Scene::sample(&mut rng);
        let text = caption(&scene, &mut rng);
        for o in &scene.objects {
            let named = format!("{} {}", o.colour, o.shape.name());
            assert!(text.contains(&named), "`{text}` lacks `{named}`");
        }
        if let [a, b] = scene.objects.as_slice() {
            let (ab, ba) = (relation(a, b), relation(b, a));
            let first_a = text.find(&format!("{} {}", a.colour, a.shape.name()))
                < text.find(&format!("{} {}", b.colour, b.shape.name()));
            for rel in ["to the left of", "to the right of", "above", "below"] {
                if text.contains(rel) {
                    relations += 1;
                    assert_eq!(
                        rel,
                        if first_a { ab } else { ba },
                        "`{text}`: {a:?} vs {b:?}"
                    );
                }
            }
        }
    }
    assert!(relations > 100, "relations are used ({relations})");
    let words: std::collections::HashSet<String> = (0..200)
        .map(|i| make_sample(0, i, 32).unwrap().caption)
        .collect();
    assert!(words.len() > 150, "varied wording");
}

#[test]
fn bad_specs_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = |resolution, shard_size| ShapesSpec {
        count: 3,
        resolution,
        seed: 0,
        shard_size,
        out: tmp.path().into(),
        prefix: "t".into(),
    };
    assert!(write_shapes_shards(&spec(31, 10))
        .unwrap_err()
        .to_string()
        .contains("resolution 31"));
    assert!(write_shapes_shards(&spec(1025, 10))
        .unwrap_err()
        .to_string()
        .contains("resolution 1025"));
    assert!(write_shapes_shards(&spec(64, 0))
        .unwrap_err()
        .to_string()
        .contains("shard size"));
}

#[test]
fn shards_are_reproducible_and_load_in_python_webdataset() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = ShapesSpec {
        count: 25,
        resolution: 48,
        seed: 11,
        shard_size: 10,
        out: tmp.path().join("a"),
        prefix: "train".into(),
    };
    let shards = write_shapes_shards(&spec).unwrap();
    assert_eq!(shards.len(), 3);
    let again = write_shapes_shards(&ShapesSpec {
        out: tmp.path().join("b"),
        ..spec.clone()
    })
    .unwrap();
    for (x, y) in shards.iter().zip(&again) {
        assert_eq!(
            std::fs::read(x).unwrap(),
            std::fs::read(y).unwrap(),
            "byte-identical shards"
        );
    }
    assert!(!std::fs::read_dir(&spec.out).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));

    let script = r#"
import hashlib, json, sys
import webdataset as wds
for s in wds.WebDataset(sys.argv[1], shardshuffle=False):
    scene = json.loads(s["json"])
    print(s["__key__"], hashlib.sha256(s["png"]).hexdigest(), len(scene["objects"]), s["txt"].decode())
"#;
    let pattern = format!("{}/train-{{000000..000002}}.tar", spec.out.display());
    let lines: Vec<String> = unclip_testkit::python(script, [&pattern])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 25);
    for (i, line) in lines.iter().enumerate() {
        let s = make_sample(11, i as u64, 48).unwrap();
        let digest = sha256_hex(&s.png);
        assert_eq!(
            line,
            &format!("{} {digest} {} {}", s.key, s.scene.objects.len(), s.caption)
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
