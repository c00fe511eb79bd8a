//! A PNG grid of the upsamplers' conditioning corruptions on shapes scenes, to look at:
//! per row, the 1024-px scene shown at 256, the 64→256 stage's blurred 64-px input, and four BSR
//! degradations (1024 → 256) with different seeds.
//!
//!     cargo run --release -p unclip-data --example degradations   # writes runs/degradations.png

use image::{imageops, RgbImage};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use unclip_data::bsr::{bsr_degrade, BsrConfig, Planes};
use unclip_data::degrade::gaussian_blur;
use unclip_data::shapes::make_sample;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "runs/degradations.png".into());
    let tile = 256u32;
    let rows = 3u32;
    let mut grid = RgbImage::from_pixel(tile * 6, tile * rows, image::Rgb([255, 255, 255]));
    let cfg = BsrConfig::default();
    for row in 0..rows {
        let png = make_sample(11, u64::from(row), 1024)?.png;
        let hq = image::load_from_memory(&png)?.into_rgb8();
        let show =
            |img: &RgbImage| imageops::resize(img, tile, tile, imageops::FilterType::Nearest);
        let tiles = {
            let mut t = vec![imageops::resize(
                &hq,
                tile,
                tile,
                imageops::FilterType::Triangle,
            )];
            let low = imageops::resize(&hq, 64, 64, imageops::FilterType::Triangle);
            t.push(show(&gaussian_blur(&low, 3, 0.6)));
            for seed in 0..4 {
                let mut rng = ChaCha8Rng::seed_from_u64(seed + 10 * u64::from(row));
                let (lq, _) = bsr_degrade(&Planes::from_rgb8(&hq), &cfg, &mut rng);
                t.push(show(&lq.to_rgb8()));
            }
            t
        };
        for (col, t) in tiles.iter().enumerate() {
            imageops::replace(
                &mut grid,
                t,
                i64::from(col as u32 * tile),
                i64::from(row * tile),
            );
        }
    }
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    grid.save(&out)?;
    println!(
        "wrote {out}: columns = scene, blurred 64-px input (k=3, σ=0.6), BSR 1024→256 seeds 0–3"
    );
    Ok(())
}
