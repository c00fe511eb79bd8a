//! Data-pipeline throughput per core, this crate beside the usual Python stack on the same
//! machine and data (scripts/bench/data_pipeline.py: webdataset + PIL + numpy, and BSRGAN's own
//! cv2 / scipy degradation code):
//! read + decode + resize + random crop of 512-px PNG shards to 64 and 256 px, and BSR 1024 → 256.
//!
//!     cargo run --release -p unclip-data --example bench_data

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use unclip_data::bsr::{bsr_degrade, BsrConfig, Planes};
use unclip_data::images::{Crop, ImageTransform};
use unclip_data::reader::{ReaderConfig, ShardReader};
use unclip_data::shards::{write_shapes_shards, ShapesSpec};

fn shards(
    dir: &str,
    prefix: &str,
    count: u64,
    resolution: u32,
) -> Result<String, Box<dyn std::error::Error>> {
    let n = count.div_ceil(100);
    let pattern = format!("{dir}/{prefix}-{{000000..{:06}}}.tar", n - 1);
    if unclip_data::reader::shard_list(&pattern).is_err() {
        write_shapes_shards(&ShapesSpec {
            count,
            resolution,
            seed: 7,
            shard_size: 100,
            out: dir.into(),
            prefix: prefix.into(),
        })?;
    }
    Ok(pattern)
}

/// Passes over the 400 source images per measurement (both sides), so each takes seconds.
const PASSES: usize = 3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = "data/bench";
    let source = shards(dir, "src512", 400, 512)?;
    let big = shards(dir, "src1024", 16, 1024)?;
    let reader_cfg = |shards: &str| ReaderConfig::in_order(shards.to_string());

    // Ours, on this thread only.
    let mut ours = Vec::new();
    for res in [64u32, 256] {
        let t = ImageTransform {
            resolution: res,
            crop: Crop::Random,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut out = vec![0f32; t.numel()];
        let start = Instant::now();
        let mut n = 0;
        for _ in 0..PASSES {
            let reader = ShardReader::new(&reader_cfg(&source), 0)?;
            for s in reader.iter() {
                t.apply(&s.image, &mut rng, &mut out)?;
                n += 1;
            }
        }
        ours.push((
            format!("read+decode+resize+crop 512px -> {res}"),
            n,
            start.elapsed().as_secs_f64(),
        ));
    }
    let images: Vec<Planes> = ShardReader::new(&reader_cfg(&big), 0)?
        .iter()
        .map(|s| {
            Ok(Planes::from_rgb8(
                &image::load_from_memory(&s.image)?.into_rgb8(),
            ))
        })
        .collect::<Result<_, image::ImageError>>()?;
    let cfg = BsrConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let start = Instant::now();
    for img in &images {
        let (lq, _) = bsr_degrade(img, &cfg, &mut rng);
        assert_eq!(lq.width, img.width / 4);
    }
    ours.push((
        "BSR degradation 1024 -> 256".into(),
        images.len(),
        start.elapsed().as_secs_f64(),
    ));

    // Python, one process, one thread.
    let python = std::env::var("UNCLIP_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let output = std::process::Command::new(python)
        .args([
            "scripts/bench/data_pipeline.py",
            &source,
            "64",
            "256",
            "--bsr",
            &big,
        ])
        .env("OMP_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .output()?;
    if !output.status.success() {
        return Err(format!("python failed: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    let text = String::from_utf8(output.stdout)?;
    let theirs: Vec<(usize, f64)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().skip(1);
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    println!(
        "{:<40} {:>14} {:>14} {:>8}",
        "samples/s on one core", "unclip-data", "Python", "ratio"
    );
    for ((name, n, secs), (pn, psecs)) in ours.iter().zip(&theirs) {
        let (a, b) = (*n as f64 / secs, *pn as f64 / psecs);
        println!("{name:<40} {a:>14.1} {b:>14.1} {:>7.2}x", a / b);
    }
    Ok(())
}
