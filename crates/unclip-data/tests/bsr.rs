//! BSR degradation: shapes, ranges, determinism per seed, colour kept; aligned paired crops.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use unclip_data::bsr::{bsr_degrade, paired_random_crop, BsrConfig, Planes};
use unclip_data::shapes::make_sample;

fn scene(res: u32, index: u64) -> Planes {
    let png = make_sample(3, index, res).unwrap().png;
    Planes::from_rgb8(&image::load_from_memory(&png).unwrap().into_rgb8())
}

fn mean(p: &[f32]) -> f32 {
    p.iter().sum::<f32>() / p.len() as f32
}

#[test]
fn outputs_have_the_low_resolution_values_in_range_and_the_colours_kept() {
    let cfg = BsrConfig::default();
    for (i, res) in [(0u64, 256u32), (1, 128), (2, 200)] {
        let hq = scene(res, i);
        for seed in 0..6 {
            let (lq, hq_cropped) = bsr_degrade(&hq, &cfg, &mut ChaCha8Rng::seed_from_u64(seed));
            let side = res as usize / 4 * 4;
            assert_eq!((hq_cropped.width, hq_cropped.height), (side, side));
            assert_eq!(
                (lq.width, lq.height),
                (side / 4, side / 4),
                "res {res} seed {seed}"
            );
            for c in 0..3 {
                assert!(lq.data[c].iter().all(|v| (0.0..=1.0).contains(v)));
                let (a, b) = (mean(&lq.data[c]), mean(&hq_cropped.data[c]));
                assert!((a - b).abs() < 0.08, "channel {c}: mean {a} vs {b}");
            }
        }
    }
    let two = BsrConfig {
        scale: 2,
        second_round_prob: 1.0,
        ..Default::default()
    };
    let (lq, _) = bsr_degrade(&scene(128, 4), &two, &mut ChaCha8Rng::seed_from_u64(1));
    assert_eq!((lq.width, lq.height), (64, 64));
}

#[test]
fn same_seed_same_degradation_other_seed_other() {
    let hq = scene(128, 5);
    let cfg = BsrConfig::default();
    let run = |s| bsr_degrade(&hq, &cfg, &mut ChaCha8Rng::seed_from_u64(s)).0;
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    // It degrades: far from a clean resize of the same image.
    let lq = run(7);
    assert!(lq.data[0] != run(9).data[0]);
}

#[test]
fn bad_configs_are_rejected() {
    for cfg in [
        BsrConfig {
            scale: 1,
            ..Default::default()
        },
        BsrConfig {
            jpeg_prob: 1.5,
            ..Default::default()
        },
        BsrConfig {
            noise_levels: [5.0, 1.0],
            ..Default::default()
        },
        BsrConfig {
            jpeg_quality: [90, 30],
            ..Default::default()
        },
    ] {
        assert!(cfg.validate().is_err(), "{cfg:?}");
    }
    assert!(BsrConfig::default().validate().is_ok());
}

#[test]
fn paired_crops_cover_the_same_region() {
    // R encodes x and G encodes y, so a crop's mean tells where it came from.
    let (w, h) = (96usize, 64usize);
    let ramp = |w: usize, h: usize| Planes {
        width: w,
        height: h,
        data: [
            (0..w * h).map(|i| (i % w) as f32 / w as f32).collect(),
            (0..w * h).map(|i| (i / w) as f32 / h as f32).collect(),
            vec![0.5; w * h],
        ],
    };
    let (hq, lq) = (ramp(w, h), ramp(w / 4, h / 4));
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut lefts = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (l, hcrop) = paired_random_crop(&lq, &hq, 4, 6, &mut rng).unwrap();
        assert_eq!((l.width, hcrop.width, hcrop.height), (6, 24, 24));
        for c in 0..2 {
            let (a, b) = (mean(&l.data[c]), mean(&hcrop.data[c]));
            assert!((a - b).abs() < 0.05, "channel {c}: {a} vs {b}");
        }
        lefts.insert((mean(&l.data[0]) * 1000.0) as i32);
    }
    assert!(lefts.len() > 3, "crops move");
    assert!(paired_random_crop(&lq, &ramp(50, 50), 4, 6, &mut rng).is_err());
    assert!(paired_random_crop(&lq, &hq, 4, 40, &mut rng).is_err());
}
