//! `train-clip --dry-run` on the committed configs: they parse, build, and the public shapes have
//! OpenAI's parameter counts; a bad value fails before any work, naming the key.
use std::process::Command;

fn dry_run(config: &str, extra: &[&str]) -> (bool, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new(env!("CARGO_BIN_EXE_train-clip"))
        .current_dir(root)
        .args(["--config", config, "--dry-run", "--set", "device=cpu"])
        .args(extra)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn total(text: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("total"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn committed_configs_build_with_the_published_sizes() {
    for (config, want) in [
        ("configs/clip/vit-b-32.yaml", Some(151_277_313u64)),
        ("configs/clip/vit-l-14.yaml", Some(427_616_513)),
        // open_clip's RN50: 102,007,137 parameters + 53,248 BatchNorm running statistics.
        ("configs/clip/rn50.yaml", Some(102_060_385)),
        ("configs/shapes/clip.yaml", None),
        ("configs/shapes/clip-vit.yaml", None),
    ] {
        let (ok, text) = dry_run(config, &[]);
        assert!(ok, "{config}: {text}");
        if let Some(want) = want {
            assert_eq!(total(&text), want, "{config}");
        }
    }
}

#[test]
fn a_bad_value_fails_naming_the_key() {
    let (ok, text) = dry_run(
        "configs/shapes/clip-vit.yaml",
        &["--set", "model.vision.patch_size=5"],
    );
    assert!(!ok);
    assert!(
        text.contains("model.vision.patch_size") && text.contains("configs/shapes/clip-vit.yaml"),
        "{text}"
    );
    // The ResNet tower: its attention-pool heads must divide its 1024 final channels, and the
    // ViT's keys are refused rather than ignored.
    let (ok, text) = dry_run(
        "configs/shapes/clip.yaml",
        &["--set", "model.vision.heads=5"],
    );
    assert!(
        !ok && text.contains("model.vision.heads") && text.contains("1024"),
        "{text}"
    );
    let (ok, text) = dry_run(
        "configs/shapes/clip.yaml",
        &["--set", "model.vision.patch_size=8"],
    );
    assert!(!ok && text.contains("patch_size"), "{text}");
    let (ok, text) = dry_run(
        "configs/shapes/clip.yaml",
        &["--set", "model.vision.depth=5"],
    );
    assert!(!ok && text.contains("depth"), "{text}");
}
