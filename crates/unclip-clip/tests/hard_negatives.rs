//! NegCLIP's loss against an explicit computation of its softmax, and the hard-negative accuracy.

use tch::{Device, Kind, Tensor};
use unclip_clip::loss::{
    contrastive_loss, contrastive_loss_with_negatives, hard_negative_accuracy, HardNegatives,
};

fn unit(rows: &Tensor) -> Tensor {
    rows / rows.norm_scalaropt_dim(2.0, [-1], true)
}

/// (CE over [captions ‖ valid negatives] for each image + CE over images for each caption) / 2,
/// one row at a time in f64.
fn explicit(img: &Tensor, txt: &Tensor, neg: &Tensor, valid: &[bool], scale: f64) -> f64 {
    let (img, txt, neg) = (
        unit(img).to_kind(Kind::Double),
        unit(txt).to_kind(Kind::Double),
        unit(neg).to_kind(Kind::Double),
    );
    let n = img.size()[0];
    let sim = |a: &Tensor, b: &Tensor| (a * b).sum(Kind::Double).double_value(&[]) * scale;
    let (mut i2t, mut t2i) = (0.0, 0.0);
    for i in 0..n {
        let mut row: Vec<f64> = (0..n).map(|j| sim(&img.get(i), &txt.get(j))).collect();
        row.extend(
            (0..n)
                .filter(|&j| valid[j as usize])
                .map(|j| sim(&img.get(i), &neg.get(j))),
        );
        let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
        i2t += lse - row[i as usize];
        let col: Vec<f64> = (0..n).map(|j| sim(&img.get(j), &txt.get(i))).collect();
        t2i += col.iter().map(|v| v.exp()).sum::<f64>().ln() - col[i as usize];
    }
    (i2t + t2i) / (2.0 * n as f64)
}

#[test]
fn the_negclip_loss_is_its_softmax_over_captions_and_valid_negatives() {
    tch::manual_seed(3);
    let opts = (Kind::Float, Device::Cpu);
    let (img, txt, neg) = (
        Tensor::randn([6, 16], opts),
        Tensor::randn([6, 16], opts),
        Tensor::randn([6, 16], opts),
    );
    let scale = Tensor::from(7.5f32);
    let valid = [true, false, true, true, false, true];
    let mask = Tensor::from_slice(&valid);
    let negatives = HardNegatives {
        text_embeds: &neg,
        valid: &mask,
    };
    let got = contrastive_loss_with_negatives(&img, &txt, &negatives, &scale, None)
        .unwrap()
        .loss
        .double_value(&[]);
    let want = explicit(&img, &txt, &neg, &valid, 7.5);
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // More candidates can only make image→text harder.
    let plain = contrastive_loss(&img, &txt, &scale, None)
        .unwrap()
        .loss
        .double_value(&[]);
    assert!(got > plain, "{got} <= {plain}");
    // No valid negative: exactly the plain loss.
    let none = Tensor::from_slice(&[false; 6]);
    let same = contrastive_loss_with_negatives(
        &img,
        &txt,
        &HardNegatives {
            text_embeds: &neg,
            valid: &none,
        },
        &scale,
        None,
    )
    .unwrap()
    .loss
    .double_value(&[]);
    assert!((same - plain).abs() < 1e-6, "{same} vs {plain}");
}

#[test]
fn gradients_reach_valid_negatives_only() {
    tch::manual_seed(4);
    let opts = (Kind::Float, Device::Cpu);
    let img = Tensor::randn([4, 8], opts);
    let txt = Tensor::randn([4, 8], opts);
    let neg = Tensor::randn([4, 8], opts).set_requires_grad(true);
    let valid = Tensor::from_slice(&[true, false, true, false]);
    let out = contrastive_loss_with_negatives(
        &img,
        &txt,
        &HardNegatives {
            text_embeds: &neg,
            valid: &valid,
        },
        &Tensor::from(10f32),
        None,
    )
    .unwrap();
    out.loss.backward();
    let per_row = neg.grad().abs().sum_dim_intlist(-1, false, Kind::Float);
    let g: Vec<f32> = Vec::try_from(&per_row).unwrap();
    assert!(g[0] > 1e-4 && g[2] > 1e-4, "{g:?}");
    assert_eq!((g[1], g[3]), (0.0, 0.0), "{g:?}");
}

#[test]
fn hard_negative_accuracy_counts_captions_closer_than_their_twins() {
    let e = |v: &[f32]| Tensor::from_slice(v).view([-1, 2]);
    let img = e(&[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]);
    let txt = e(&[1.0, 0.1, 0.2, 1.0, 0.1, 1.0, 1.0, 0.0]);
    let neg = e(&[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
    let acc = |valid: &[bool]| {
        hard_negative_accuracy(
            &img,
            &txt,
            &HardNegatives {
                text_embeds: &neg,
                valid: &Tensor::from_slice(valid),
            },
        )
        .unwrap()
    };
    // Rows 0 and 2 beat their twins, rows 1 and 3 do not.
    assert_eq!(acc(&[true; 4]), Some(0.5));
    assert_eq!(acc(&[true, false, true, false]), Some(1.0));
    assert_eq!(acc(&[false, true, false, false]), Some(0.0));
    assert_eq!(acc(&[false; 4]), None);
}
