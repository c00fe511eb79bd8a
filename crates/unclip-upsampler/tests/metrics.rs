//! The grids' scores: PSNR and the sharpness ratio's contrast.
use tch::{Device, Kind, Tensor};
use unclip_upsampler::task::{contrast, psnr};

#[test]
fn psnr_is_in_db_of_pixels_in_0_1() {
    let a = Tensor::zeros([2, 3, 8, 8], (Kind::Float, Device::Cpu));
    // 0.2 apart in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, 20 dB.
    assert!((psnr(&a, &(&a + 0.2)).unwrap() - 20.0).abs() < 1e-6);
    // The mean over images: 20 and 40 dB average to 30.
    let b = Tensor::cat(
        &[a.get(0).unsqueeze(0) + 0.2, a.get(1).unsqueeze(0) + 0.02],
        0,
    );
    assert!((psnr(&a, &b).unwrap() - 30.0).abs() < 1e-6);
    assert!(psnr(&a, &a.narrow(2, 0, 4)).is_err());
}

#[test]
fn contrast_drops_when_edges_blur() {
    // A sharp vertical edge: one jump of 2 in 7 horizontal steps per row, none vertically
    // (8 × 7 of each): RMS √((4/7 + 0) / 2).
    let sharp = Tensor::cat(
        &[
            Tensor::full([1, 3, 8, 4], -1.0, (Kind::Float, Device::Cpu)),
            Tensor::full([1, 3, 8, 4], 1.0, (Kind::Float, Device::Cpu)),
        ],
        3,
    );
    assert!((contrast(&sharp) - (4.0_f64 / 7.0 / 2.0).sqrt()).abs() < 1e-9);
    // Spread over three steps of 2/3 the edge has a third of the squared differences.
    let blurred = sharp.avg_pool2d([1, 3], [1, 1], [0, 1], false, false, None::<i64>);
    let ratio = contrast(&blurred) / contrast(&sharp);
    assert!((ratio - (1.0_f64 / 3.0).sqrt()).abs() < 1e-6, "{ratio}");
    // Noise adds contrast.
    tch::manual_seed(0);
    let noisy = &sharp + sharp.randn_like() * 0.1;
    assert!(contrast(&noisy) > contrast(&sharp));
}
