//! `evaluate`'s figures against closed forms: the Fréchet distance (2-D Gaussians in general
//! position, commuting covariances in any dimension, shifts), the covariance against torch's
//! `cov`, CLIP's top-1 retrieval and the distinct-caption index; precision, recall, density and
//! coverage against the `prdc` package (fixtures from scripts/fixtures/prdc_metrics.py).
use std::collections::HashMap;
use tch::{Kind, Tensor};
use unclip_cli::evaluate::{
    caption_top1, frechet_distance, frechet_distance_of, moments, precision_recall, HeldOutImages,
};

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// A random symmetric positive definite [d, d] matrix.
fn spd(d: i64) -> Tensor {
    let a = Tensor::randn([d, d], (Kind::Double, tch::Device::Cpu));
    a.matmul(&a.tr()) + Tensor::eye(d, (Kind::Double, tch::Device::Cpu)) * 0.1
}

#[test]
fn frechet_distance_of_2d_gaussians_matches_the_closed_form() {
    tch::manual_seed(0);
    for _ in 0..20 {
        let (a, b) = (spd(2), spd(2));
        let mu_a = Tensor::randn([2], (Kind::Double, tch::Device::Cpu));
        let mu_b = Tensor::randn([2], (Kind::Double, tch::Device::Cpu));
        // For a 2×2 matrix with eigenvalues λ1, λ2 ≥ 0: √λ1 + √λ2 = √(tr M + 2 √det M).
        let m = f64s(&a.matmul(&b));
        let (tr, det) = (m[0] + m[3], m[0] * m[3] - m[1] * m[2]);
        let tr_root = (tr + 2.0 * det.sqrt()).sqrt();
        let mean_term: f64 = f64s(&(&mu_a - &mu_b)).iter().map(|x| x * x).sum();
        let (ta, tb) = (f64s(&a.trace())[0], f64s(&b.trace())[0]);
        let want = mean_term + ta + tb - 2.0 * tr_root;
        let got = frechet_distance_of(&mu_a, &a, &mu_b, &b).unwrap();
        assert!(
            (got - want).abs() < 1e-9 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
}

#[test]
fn frechet_distance_of_commuting_covariances_is_the_root_difference() {
    tch::manual_seed(1);
    let d = 16;
    let (q, _) = Tensor::linalg_qr(
        &Tensor::randn([d, d], (Kind::Double, tch::Device::Cpu)),
        "reduced",
    );
    let la = Tensor::rand([d], (Kind::Double, tch::Device::Cpu)) * 3.0;
    let lb = Tensor::rand([d], (Kind::Double, tch::Device::Cpu)) * 3.0;
    let a = (&q * la.unsqueeze(0)).matmul(&q.tr());
    let b = (&q * lb.unsqueeze(0)).matmul(&q.tr());
    let mu = Tensor::randn([d], (Kind::Double, tch::Device::Cpu));
    let zero = Tensor::zeros([d], (Kind::Double, tch::Device::Cpu));
    let want: f64 = f64s(&mu).iter().map(|x| x * x).sum::<f64>()
        + f64s(&(la.sqrt() - lb.sqrt()))
            .iter()
            .map(|x| x * x)
            .sum::<f64>();
    let got = frechet_distance_of(&mu, &a, &zero, &b).unwrap();
    assert!((got - want).abs() < 1e-8, "{got} vs {want}");
}

#[test]
fn frechet_distance_of_samples_is_zero_to_themselves_and_a_shift_squared() {
    tch::manual_seed(2);
    let x = Tensor::randn([300, 24], (Kind::Float, tch::Device::Cpu));
    let same = frechet_distance(&x, &x).unwrap();
    assert!(same.abs() < 1e-6, "{same}");
    let shift = Tensor::randn([24], (Kind::Float, tch::Device::Cpu));
    let want: f64 = f64s(&shift).iter().map(|x| x * x).sum();
    let got = frechet_distance(&x, &(&x + &shift)).unwrap();
    assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
    // A scaled copy: covariances commute, so the distance is tr Σ (1 − s)² plus the mean term.
    let (mu, sigma) = moments(&x).unwrap();
    let s = 1.7;
    let want = f64s(&mu)
        .iter()
        .map(|m| (m * (1.0 - s)).powi(2))
        .sum::<f64>()
        + f64s(&sigma.trace())[0] * (1.0 - s) * (1.0 - s);
    let got = frechet_distance(&x, &(&x * s)).unwrap();
    assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
    // Different samples of one distribution: small against the shift's distance.
    let y = Tensor::randn([300, 24], (Kind::Float, tch::Device::Cpu));
    let other = frechet_distance(&x, &y).unwrap();
    assert!(other > 0.0 && other < 0.1 * 24.0, "{other}");
    assert!(frechet_distance(&x.narrow(0, 0, 1), &y).is_err());
}

#[test]
fn moments_are_the_mean_and_torchs_unbiased_covariance() {
    tch::manual_seed(3);
    let x = Tensor::randn([50, 6], (Kind::Float, tch::Device::Cpu)) * 2.0 + 1.0;
    let (mu, sigma) = moments(&x).unwrap();
    let x64 = x.to_kind(Kind::Double);
    let want_mu = x64.mean_dim(0, false, Kind::Double);
    let want_sigma = x64.tr().cov(1, None::<Tensor>, None::<Tensor>);
    assert!(f64s(&(mu - want_mu).abs().max())[0] < 1e-12);
    assert!(f64s(&(sigma - want_sigma).abs().max())[0] < 1e-12);
}

#[test]
fn caption_top1_counts_rows_whose_own_caption_is_nearest() {
    // Images 0..4 near captions [0, 1, 2, 0]; their own captions are [0, 1, 0, 0]: 3 of 4.
    let captions = Tensor::eye(3, (Kind::Float, tch::Device::Cpu));
    let nearest = Tensor::from_slice(&[0i64, 1, 2, 0]);
    let images = captions.index_select(0, &nearest) * 0.9 + 0.01;
    let own = Tensor::from_slice(&[0i64, 1, 0, 0]);
    assert_eq!(caption_top1(&images, &captions, &own).unwrap(), 0.75);
}

#[test]
fn distinct_captions_index_each_sample_by_first_appearance() {
    let held = HeldOutImages {
        keys: vec!["a".into(), "b".into(), "c".into(), "d".into()],
        captions: ["red", "blue", "red", "green"].map(String::from).to_vec(),
        image_embeds: Tensor::zeros([4, 2], (Kind::Float, tch::Device::Cpu)),
        scenes: None,
        real_shapes: None,
        skipped: 0,
    };
    let (distinct, own) = held.distinct_captions();
    assert_eq!(distinct, ["red", "blue", "green"]);
    assert_eq!(own, [0, 1, 0, 2]);
}

#[test]
fn precision_recall_density_and_coverage_match_prdc() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/prdc/prdc.safetensors");
    let f: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{} (run scripts/fixtures/prdc_metrics.py): {e}",
                path.display()
            )
        })
        .into_iter()
        .collect();
    let real = &f["real"];
    for case in ["same", "shifted", "collapsed", "spread", "few"] {
        for k in [3usize, 5] {
            let m = precision_recall(real, &f[&format!("{case}.fake")], k)
                .unwrap()
                .expect("enough samples");
            let want = f64s(&f[&format!("{case}.k{k}")]);
            let got = [m.precision, m.recall, m.density, m.coverage];
            for (name, (g, w)) in ["precision", "recall", "density", "coverage"]
                .iter()
                .zip(got.iter().zip(&want))
            {
                assert!(
                    (g - w).abs() < 1e-12,
                    "{case}, k = {k}: {name} {g} vs prdc's {w}"
                );
            }
        }
    }
    // A set against itself: every sample inside its own ball.
    let m = precision_recall(real, real, 5).unwrap().unwrap();
    assert_eq!((m.precision, m.recall, m.coverage), (1.0, 1.0, 1.0));
    // Balls need more than k samples in each set.
    assert!(precision_recall(real, &real.narrow(0, 0, 5), 5)
        .unwrap()
        .is_none());
    assert!(
        precision_recall(&real.narrow(0, 0, 6), &real.narrow(0, 0, 6), 5)
            .unwrap()
            .is_some()
    );
}
