//! CLIP's tokenizer against open_clip's ids (scripts/fixtures/data.py).
use unclip_data::tokenizer::{ClipTokenizer, DEFAULT_CONTEXT_LENGTH};

#[derive(serde::Deserialize)]
struct Fixture {
    captions: Vec<String>,
    ids77: Vec<Vec<i64>>,
    ids16: Vec<Vec<i64>>,
}

fn fixture() -> Fixture {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_tokenizer.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn ids_equal_open_clip_on_varied_captions() {
    let fx = fixture();
    assert!(fx.captions.len() >= 1000);
    let tok = ClipTokenizer::new();
    let mut mismatches = Vec::new();
    for (caption, want) in fx.captions.iter().zip(&fx.ids77) {
        let got = tok.tokenize(caption, DEFAULT_CONTEXT_LENGTH);
        if &got != want {
            mismatches.push(format!("{caption:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} differ:\n{}",
        mismatches.len(),
        fx.captions.len(),
        mismatches[..mismatches.len().min(5)].join("\n")
    );
    for (caption, want) in fx.captions.iter().zip(&fx.ids16) {
        assert_eq!(
            &tok.tokenize(caption, 16),
            want,
            "{caption:?} at context 16"
        );
    }
}

#[test]
fn vocabulary_and_special_tokens() {
    let tok = ClipTokenizer::new();
    assert_eq!(tok.vocab_size(), 49_408);
    assert_eq!(tok.sot_id(), 49_406);
    assert_eq!(tok.eot_id(), 49_407);
    let ids = tok.tokenize("", 5);
    assert_eq!(ids, vec![49_406, 49_407, 0, 0, 0]);
    // Truncation keeps the end token last.
    let long = tok.tokenize(&"circle ".repeat(200), 77);
    assert_eq!(long.len(), 77);
    assert_eq!(long[76], 49_407);
    assert!(long.iter().all(|&t| t != 0));
}

#[test]
fn decode_inverts_encode_on_clean_text() {
    let tok = ClipTokenizer::new();
    let text = "a small red circle to the left of a large blue square, 42 stars!";
    let ids = tok.encode(text);
    assert_eq!(
        tok.decode(&ids).trim_end(),
        text.replace(',', " ,")
            .replace('!', " !")
            .replace("42", "4 2")
    );
}

#[test]
fn a_bad_merges_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt.gz");
    let err = ClipTokenizer::from_file(&missing)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope.txt.gz"), "{err}");
    let short = dir.path().join("short.txt.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"#version\na b\n").unwrap();
    std::fs::write(&short, gz.finish().unwrap()).unwrap();
    let err = ClipTokenizer::from_file(&short).err().unwrap().to_string();
    assert!(
        err.contains("short.txt.gz") && err.contains("merges"),
        "{err}"
    );
}
