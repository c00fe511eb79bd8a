//! `sample --variations / --interpolate / --text-diff` on the tiny trained decoder: the round trip
//! through (z_i, x_T) reconstructs the image, η reaches the decoder, the interpolation and
//! text-diff embeddings are the paper's slerps, the ends of a slerped interpolation are the two
//! reconstructions, the PCA probe's full set of components rebuilds z_i, and bad options are
//! refused before any work.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};
use unclip_cli::manipulate::{LatentPath, Manipulation};
use unclip_cli::pipeline::Pipeline;
use unclip_data::reader::{ReaderConfig, ShardReader};

use super::{png, Runs};
use crate::common::{run, run_fails};

/// The first `n` held-out shapes images as PNG files.
pub(super) fn input_images(runs: &Runs, n: usize) -> Vec<PathBuf> {
    let shard = runs.path("shapes").join("val-000000.tar");
    let reader = ShardReader::new(&ReaderConfig::in_order(shard.display().to_string()), 0).unwrap();
    let dir = runs.path("inputs");
    std::fs::create_dir_all(&dir).unwrap();
    reader
        .iter()
        .take(n)
        .map(|s| {
            let path = dir.join(format!("{}.png", s.key));
            std::fs::write(&path, &s.image).unwrap();
            path
        })
        .collect()
}

/// `sample --decoder RUN --out OUT` with `extra`; the report.
fn manipulate(runs: &Runs, out: &str, extra: &[&str]) -> serde_json::Value {
    let out = runs.path(out);
    let decoder = runs.path("decoder");
    let mut args = vec![
        "--decoder",
        decoder.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--decoder-sampling",
        "{steps: ddim10}",
    ];
    args.extend(extra);
    run(env!("CARGO_BIN_EXE_sample"), &args);
    serde_json::from_str(&std::fs::read_to_string(out.join("manipulations.json")).unwrap()).unwrap()
}

/// RMSE of two PNGs on the [0, 1] scale.
fn png_rmse(a: &Path, b: &Path) -> f64 {
    let (a, b) = (png(a), png(b));
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| ((f64::from(x) - f64::from(y)) / 255.0).powi(2))
        .sum();
    (sum / a.as_raw().len() as f64).sqrt()
}

fn column(runs: &Runs, out: &str, row: usize, k: usize) -> PathBuf {
    runs.path(out).join(format!("{row:03}_{k:02}.png"))
}

fn rmse(report: &serde_json::Value, row: usize) -> Vec<f64> {
    report[row]["reconstruction_rmse"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// The angle between rows of two [N, D] tensors.
fn angles(a: &Tensor, b: &Tensor) -> Vec<f64> {
    let cos = (a * b).sum_dim_intlist(-1, false, Kind::Double)
        / (a.norm_scalaropt_dim(2.0, [-1i64].as_slice(), false)
            * b.norm_scalaropt_dim(2.0, [-1i64].as_slice(), false));
    Vec::<f64>::try_from(&cos.clamp(-1.0, 1.0).acos()).unwrap()
}

pub fn manipulations_invert_and_decode(runs: &Runs) {
    let images = input_images(runs, 3);
    let [a, b, c] = [0, 1, 2].map(|i| images[i].to_str().unwrap());

    // Variations: the input as given (32 px, the decoder's side), its reconstruction, variations.
    let report = manipulate(
        runs,
        "var",
        &[
            "--variations",
            a,
            "--variations",
            b,
            "--count",
            "2",
            "--eta",
            "1",
        ],
    );
    assert_eq!(report.as_array().unwrap().len(), 2);
    for (row, input) in [a, b].iter().enumerate() {
        let columns = report[row]["columns"].as_array().unwrap();
        let kinds: Vec<&str> = columns
            .iter()
            .map(|c| c["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["input", "reconstruction", "variation", "variation"]);
        assert_eq!(
            png_rmse(&column(runs, "var", row, 0), Path::new(input)),
            0.0
        );
        // The round trip: the reported RMSE (float images) and the saved PNGs' agree.
        let r = rmse(&report, row)[0];
        assert!(r < 0.01, "row {row}: reconstruction RMSE {r}");
        let saved = png_rmse(&column(runs, "var", row, 1), Path::new(input));
        assert!(
            (saved - r).abs() < 0.003,
            "row {row}: PNG RMSE {saved} vs reported {r}"
        );
        // η = 1 moves away from the image; the two variations differ (their own noise).
        let v = png_rmse(&column(runs, "var", row, 2), Path::new(input));
        assert!(
            v > 5.0 * r.max(0.002),
            "row {row}: variation RMSE {v}, reconstruction {r}"
        );
        assert!(png_rmse(&column(runs, "var", row, 2), &column(runs, "var", row, 3)) > 0.01);
    }
    // η = 0 variations are reconstructions; the classic inversion (no fixed-point iterations) is
    // further from the image; the same seed repeats.
    let eta0 = manipulate(
        runs,
        "var-eta0",
        &["--variations", a, "--count", "1", "--eta", "0"],
    );
    assert_eq!(
        png_rmse(
            &column(runs, "var-eta0", 0, 1),
            &column(runs, "var-eta0", 0, 2)
        ),
        0.0
    );
    // (A batch of one image stops its fixed-point iterations at other points than one of two.)
    assert!((rmse(&eta0, 0)[0] - rmse(&report, 0)[0]).abs() < 1e-3);
    // With an upsampler every column is at its size; the round trip is measured before it.
    let upsampler = runs.path("upsampler");
    let up = manipulate(
        runs,
        "var-up",
        &[
            "--variations",
            a,
            "--count",
            "1",
            "--eta",
            "0",
            "--upsampler",
            upsampler.to_str().unwrap(),
        ],
    );
    for k in 0..3 {
        assert_eq!(png(&column(runs, "var-up", 0, k)).dimensions(), (64, 64));
    }
    assert_eq!(rmse(&up, 0), rmse(&eta0, 0));
    let classic = manipulate(
        runs,
        "var-classic",
        &["--variations", a, "--inversion-iters", "0"],
    );
    assert!(
        rmse(&classic, 0)[0] > 2.0 * rmse(&report, 0)[0],
        "classic {:?} vs 2 iterations {:?}",
        rmse(&classic, 0),
        rmse(&report, 0)
    );
    manipulate(
        runs,
        "var-again",
        &[
            "--variations",
            a,
            "--variations",
            b,
            "--count",
            "2",
            "--eta",
            "1",
        ],
    );
    for k in 0..4 {
        assert_eq!(
            png_rmse(&column(runs, "var", 1, k), &column(runs, "var-again", 1, k)),
            0.0
        );
    }
    // Guided inversion and decoding round-trip too.
    let guided = manipulate(
        runs,
        "var-guided",
        &["--variations", a, "--decoder-guidance", "3", "--count", "1"],
    );
    assert!(rmse(&guided, 0)[0] < 0.01, "{:?}", rmse(&guided, 0));

    // Interpolation with slerped latents: the ends are the two reconstructions.
    let report = manipulate(
        runs,
        "interp",
        &[
            "--interpolate",
            a,
            b,
            "--interpolate",
            b,
            c,
            "--frames",
            "4",
        ],
    );
    for (row, (x, y)) in [(a, b), (b, c)].into_iter().enumerate() {
        let r = rmse(&report, row);
        assert!(
            r.len() == 2 && r.iter().all(|&e| e < 0.01),
            "row {row}: {r:?}"
        );
        assert!(png_rmse(&column(runs, "interp", row, 1), Path::new(x)) < 0.015);
        assert!(png_rmse(&column(runs, "interp", row, 4), Path::new(y)) < 0.015);
        assert_eq!(png_rmse(&column(runs, "interp", row, 5), Path::new(y)), 0.0);
        let thetas: Vec<f64> = report[row]["columns"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["theta"].as_f64())
            .collect();
        assert_eq!(thetas.len(), 4);
        assert!((thetas[1] - 1.0 / 3.0).abs() < 1e-12 && thetas[3] == 1.0);
    }
    // Held x_T: the ends are no longer reconstructions.
    let held = manipulate(
        runs,
        "interp-fixed",
        &["--interpolate", a, b, "--frames", "3", "--latent", "fixed"],
    );
    assert!(rmse(&held, 0).is_empty());
    assert!(png_rmse(&column(runs, "interp-fixed", 0, 1), Path::new(a)) > 0.05);

    // The embeddings decoded, through the library: the paper's slerps.
    let pipeline = Pipeline::load(None, &runs.path("decoder"), None, tch::Device::Cpu).unwrap();
    let mut o = pipeline.manipulation_options();
    o.sampling.steps = unclip_diffusion::Respacing::Spec("ddim10".into());
    let z = pipeline
        .read_images(&images, 4)
        .unwrap()
        .image_embeds
        .to_kind(Kind::Double);
    let rows = pipeline
        .manipulate(
            &Manipulation::Interpolations {
                pairs: vec![(images[0].clone(), images[1].clone())],
                frames: 5,
                latent: LatentPath::Slerp,
            },
            &o,
        )
        .unwrap();
    let frames = rows[0].decoded_embeds.to_kind(Kind::Double);
    let (za, zb) = (z.get(0).unsqueeze(0), z.get(1).unsqueeze(0));
    let whole = angles(&za, &zb)[0];
    assert!(whole > 0.05, "distinct images' embeddings: angle {whole}");
    for (k, (to_a, to_b)) in angles(&frames, &za.expand_as(&frames))
        .into_iter()
        .zip(angles(&frames, &zb.expand_as(&frames)))
        .enumerate()
    {
        let theta = k as f64 / 4.0;
        assert!(
            (to_a - theta * whole).abs() < 1e-4,
            "frame {k}: {to_a} vs {}",
            theta * whole
        );
        assert!(
            (to_b - (1.0 - theta) * whole).abs() < 1e-4,
            "frame {k}: {to_b}"
        );
    }
    let norms = frames.norm_scalaropt_dim(2.0, [-1i64].as_slice(), false);
    assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);

    // Text diffs: z_θ = slerp(z_i, norm(z_t − z_t0), θ) for θ up to --max-theta; θ = 0 reconstructs.
    let (from, to) = ("a red circle", "a blue square on a black background");
    let report = manipulate(
        runs,
        "diff",
        &[
            "--text-diff",
            a,
            "--from",
            from,
            "--to",
            to,
            "--frames",
            "3",
            "--max-theta",
            "0.4",
        ],
    );
    assert!(rmse(&report, 0)[0] < 0.01);
    let recon = column(runs, "diff", 0, 1);
    assert!(png_rmse(&recon, &column(runs, "var", 0, 1)) < 0.004);
    let moved = png_rmse(&column(runs, "diff", 0, 3), &recon);
    // (Above the PNGs' 8-bit rounding: this decoder has trained 40 steps.)
    assert!(
        moved > 0.004,
        "text diff frame 3 vs reconstruction: {moved}"
    );
    let rows = pipeline
        .manipulate(
            &Manipulation::TextDiffs {
                images: vec![images[0].clone()],
                from: vec![from.into()],
                to: vec![to.into()],
                frames: 3,
                max_theta: 0.4,
            },
            &o,
        )
        .unwrap();
    let text = pipeline
        .encoder
        .encode(&[from, to])
        .unwrap()
        .text_embeds
        .to_kind(Kind::Double);
    let z_d = text.get(1) - text.get(0);
    let z_d = (&z_d / z_d.norm()).unsqueeze(0);
    let frames = rows[0].decoded_embeds.to_kind(Kind::Double);
    let zi = z.get(0).unsqueeze(0);
    let whole = angles(&zi, &z_d)[0];
    for (k, (to_zi, to_zd)) in angles(&frames, &zi.expand_as(&frames))
        .into_iter()
        .zip(angles(&frames, &z_d.expand_as(&frames)))
        .enumerate()
    {
        let theta = 0.2 * k as f64;
        assert!((to_zi - theta * whole).abs() < 1e-4, "frame {k}: {to_zi}");
        assert!(
            (to_zd - (1.0 - theta) * whole).abs() < 1e-4,
            "frame {k}: {to_zd}"
        );
    }

    // The PCA probe: all the components rebuild z_i, so that column decodes as z_i's does (the
    // same held x_T); fewer components give another embedding.
    let emb = runs.path("emb").join("img-{000000..000001}.tar");
    let report = manipulate(
        runs,
        "pca",
        &[
            "--pca-probe",
            a,
            "--pca-embeddings",
            emb.to_str().unwrap(),
            "--components",
            "1,4,32",
        ],
    );
    let columns = report[0]["columns"].as_array().unwrap();
    let ks: Vec<u64> = columns[1..]
        .iter()
        .map(|c| c["components"].as_u64().unwrap())
        .collect();
    assert_eq!(ks, [1, 4, 32, 32]);
    let explained: Vec<f64> = columns[1..]
        .iter()
        .map(|c| c["explained_variance"].as_f64().unwrap())
        .collect();
    assert!(
        explained.windows(2).all(|w| w[0] <= w[1] + 1e-12),
        "{explained:?}"
    );
    assert!(
        explained[0] > 0.0 && (explained[2] - 1.0).abs() < 1e-9,
        "{explained:?}"
    );
    // (Equal only if both columns start from the same x_T.)
    assert!(png_rmse(&column(runs, "pca", 0, 3), &column(runs, "pca", 0, 4)) < 0.004);
    let rows = pipeline
        .manipulate(
            &Manipulation::PcaProbe {
                images: vec![images[0].clone()],
                embeddings: emb.display().to_string(),
                samples: 1000,
                components: vec![2, 32],
            },
            &o,
        )
        .unwrap();
    let frames = rows[0].decoded_embeds.to_kind(Kind::Double);
    assert!((frames.get(1) - z.get(0)).abs().max().double_value(&[]) < 1e-5);
    assert!((frames.get(2) - z.get(0)).abs().max().double_value(&[]) < 1e-6);
    let norms = frames.norm_scalaropt_dim(2.0, [-1i64].as_slice(), false);
    assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
    assert!(angles(&frames.narrow(0, 0, 1), &z.narrow(0, 0, 1))[0] > 0.01);

    manipulations_refuse_bad_options(runs, a, b);
}

fn manipulations_refuse_bad_options(runs: &Runs, a: &str, b: &str) {
    let out = runs.path("refused-manipulation");
    let decoder = runs.path("decoder");
    let base = [
        "--decoder",
        decoder.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    let missing = runs.path("no-such.png");
    let emb = runs
        .path("emb")
        .join("img-000000.tar")
        .display()
        .to_string();
    let no_shards = runs.path("no-such-emb-000000.tar").display().to_string();
    for (extra, expect) in [
        (
            vec!["--variations", a, "--caption", "a red circle"],
            "cannot be used with",
        ),
        (
            vec!["--variations", a, "--interpolate", a, b],
            "cannot be used with",
        ),
        (vec!["--interpolate", a], "2 values required"),
        (vec!["--text-diff", a, "--from", "a red circle"], "--to"),
        (
            vec![
                "--text-diff",
                a,
                "--text-diff",
                b,
                "--from",
                "x",
                "--to",
                "y",
            ],
            "give one of each per image",
        ),
        (
            vec![
                "--text-diff",
                a,
                "--from",
                "x",
                "--to",
                "y",
                "--max-theta",
                "0",
            ],
            "largest theta",
        ),
        (
            vec!["--interpolate", a, b, "--frames", "1"],
            "frames must be at least 2",
        ),
        (
            vec!["--variations", missing.to_str().unwrap()],
            "no-such.png",
        ),
        (
            vec!["--variations", a, "--decoder-sampling", "{sampler: ddpm}"],
            "manipulations walk DDIM",
        ),
        (vec!["--variations", a, "--eta=-1"], "eta must be"),
        (
            vec!["--caption", "a red circle", "--eta", "0.5"],
            "cannot be used with",
        ),
        (
            vec!["--interpolate", a, b, "--eta", "0.5"],
            "--eta applies to --variations, not --interpolate",
        ),
        (
            vec!["--variations", a, "--pca-embeddings", &emb],
            "--pca-embeddings applies to --pca-probe",
        ),
        (vec!["--pca-probe", a], "--pca-embeddings"),
        (
            vec![
                "--pca-probe",
                a,
                "--pca-embeddings",
                &emb,
                "--components",
                "0,4",
            ],
            "0 components of a 32-wide embedding",
        ),
        (
            vec![
                "--pca-probe",
                a,
                "--pca-embeddings",
                &emb,
                "--pca-samples",
                "1",
            ],
            "at least 2 embeddings",
        ),
        (
            vec!["--pca-probe", a, "--pca-embeddings", &no_shards],
            "no-such-emb",
        ),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let err = run_fails(env!("CARGO_BIN_EXE_sample"), &args);
        assert!(
            err.contains(expect),
            "{extra:?}: expected {expect:?} in\n{err}"
        );
    }
    assert!(
        !out.exists(),
        "a refused manipulation wrote {}",
        out.display()
    );
}
