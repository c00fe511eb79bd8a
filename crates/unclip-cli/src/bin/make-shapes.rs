//! Writes the synthetic shapes dataset as WebDataset shards.
//!
//!     cargo run --release -p unclip-cli --bin make-shapes -- --count 10000 --resolution 64 --out data/shapes

use anyhow::Result;
use clap::Parser;
use std::time::Instant;
use unclip_data::shards::{write_shapes_shards, ShapesSpec};

#[derive(Parser)]
#[command(about = "Write the synthetic shapes text–image dataset as WebDataset tar shards")]
struct Args {
    /// Number of samples.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Image side in pixels (32 to 1024).
    #[arg(long, default_value_t = 64)]
    resolution: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    shard_size: u64,
    /// Output directory.
    #[arg(long, default_value = "data/shapes")]
    out: std::path::PathBuf,
    /// Shard name prefix: <out>/<prefix>-000000.tar
    #[arg(long, default_value = "train")]
    prefix: String,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let spec = ShapesSpec {
        count: a.count,
        resolution: a.resolution,
        seed: a.seed,
        shard_size: a.shard_size,
        out: a.out,
        prefix: a.prefix,
    };
    let start = Instant::now();
    let shards = write_shapes_shards(&spec)?;
    let secs = start.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    println!(
        "wrote {} samples at {}px in {} shards to {} in {secs:.2}s ({:.0} samples/s, {:.0} per thread on {threads} threads)",
        spec.count,
        spec.resolution,
        shards.len(),
        spec.out.display(),
        spec.count as f64 / secs,
        spec.count as f64 / secs / threads as f64
    );
    if let (Some(first), Some(last)) = (shards.first(), shards.last()) {
        println!("  {} .. {}", first.display(), last.display());
    }
    Ok(())
}
