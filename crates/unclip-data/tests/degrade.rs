//! Gaussian blur against the torchvision-equivalent reference (scripts/fixtures/data.py).
use rand::SeedableRng;
use unclip_data::degrade::{blur_planes, gaussian_blur, gaussian_kernel, BlurConfig};

fn fixture() -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blur.safetensors"),
    )
    .unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn blur_matches_the_reference_convolution() {
    let data = fixture();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let img = st.tensor("image").unwrap();
    assert_eq!(img.shape(), &[3, 17, 23]);
    let (h, w) = (17usize, 23usize);
    let planes: Vec<Vec<f32>> = img
        .data()
        .chunks(h * w)
        .map(|c| c.iter().map(|v| *v as f32).collect())
        .collect();
    for (k, sigma) in [(3usize, 0.6f32), (5, 1.3), (7, 2.0)] {
        let want = f32s(st.tensor(&format!("blur/{k}/{sigma:.2}")).unwrap().data());
        let got: Vec<f32> = blur_planes(&planes, w, h, k, sigma).concat();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "kernel {k}, sigma {sigma}: off by {worst}");
    }
    // The 8-bit path is the rounded float path.
    let rgb = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        image::Rgb([0, 1, 2].map(|c| planes[c][y as usize * w + x as usize] as u8))
    });
    let blurred = gaussian_blur(&rgb, 3, 0.6);
    let want = f32s(st.tensor("blur/3/0.60").unwrap().data());
    let off = blurred
        .enumerate_pixels()
        .flat_map(|(x, y, p)| (0..3).map(move |c| (x, y, c, p[c])))
        .filter(|(x, y, c, v)| {
            (*v as f32 - want[*c * h * w + *y as usize * w + *x as usize]).abs() > 0.5 + 1e-3
        });
    assert_eq!(off.count(), 0);
}

#[test]
fn blur_invariants_and_config() {
    let k = gaussian_kernel(3, 0.6);
    assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6 && k[0] == k[2] && k[1] > k[0]);
    let flat = image::RgbImage::from_pixel(9, 7, image::Rgb([10, 200, 77]));
    assert_eq!(
        gaussian_blur(&flat, 5, 1.5),
        flat,
        "a constant image is unchanged"
    );
    let mut img = image::RgbImage::from_pixel(9, 9, image::Rgb([0, 0, 0]));
    img.put_pixel(4, 4, image::Rgb([255, 255, 255]));
    assert_eq!(
        gaussian_blur(&img, 3, 0.05),
        img,
        "a tiny sigma is the identity"
    );
    assert!(
        gaussian_blur(&img, 3, 0.6).get_pixel(4, 4)[0] < 255,
        "a real sigma spreads a point"
    );

    assert!(BlurConfig::default().validate().is_ok());
    assert!(BlurConfig {
        kernel: 4,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .contains("odd"));
    assert!(BlurConfig {
        sigma: 0.0,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .contains("sigma"));
    assert!(BlurConfig {
        sigma_range: Some([0.8, 0.4]),
        ..Default::default()
    }
    .validate()
    .is_err());
    let ranged = BlurConfig {
        sigma_range: Some([0.4, 0.8]),
        ..Default::default()
    };
    let draw = |seed| ranged.draw_sigma(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    assert_eq!(draw(3), draw(3));
    assert!((0..50).map(draw).all(|s| (0.4..=0.8).contains(&s)));
    assert_eq!(
        BlurConfig::default().draw_sigma(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0)),
        0.6
    );
}
