//! The fused CPU GroupNorm → per-sample affine → SiLU kernel beside the same chain as ATen ops
//! (what the ResBlocks ran before, and what PyTorch eager runs in diffusers), forward + backward,
//! at the shapes decoder's and the paper-like widths. The two alternate in rounds so this
//! machine's drift hits both; prints the median milliseconds of each, their ratio, and ATen's
//! GroupNorm alone (the floor).
//!
//!     cargo run --release -p unclip-diffusion --example bench_norm_act -- [ROUNDS]
//!
//! `ATEN_CPU_CAPABILITY=default|avx2|avx512` picks the instruction set of both sides.

use std::time::Instant;
use tch::{Device, Kind, Tensor};
use unclip_diffusion::nn::{group_norm_act, group_norm_act_composite};

fn time_ms(f: &dyn Fn(), reps: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    println!(
        "threads {}, kernel build {}; batch 32, 32 groups, per-sample gain and bias, SiLU; forward + backward of sum(y * dy)",
        tch::get_num_threads(),
        unclip_diffusion::nn::norm_act::cpu_kernel_isa()
    );
    for kind in [Kind::Float, Kind::BFloat16] {
        for (channels, size) in [(32, 32), (64, 16), (128, 8), (64, 32), (128, 16), (256, 8)] {
            let x = Tensor::randn([32, channels, size, size], (Kind::Float, Device::Cpu))
                .to_kind(kind)
                .set_requires_grad(true);
            let gain = (Tensor::randn([32, channels], (Kind::Float, Device::Cpu)) + 1.0)
                .set_requires_grad(true);
            let bias =
                Tensor::randn([32, channels], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let dy = x.randn_like();
            // 0: the fused kernel, 1: the chain as ATen ops, 2: ATen's GroupNorm alone (no affine,
            // no SiLU), the floor a fused chain could reach.
            let step = |variant: usize| {
                let y = match variant {
                    0 => group_norm_act(&x, 32, 1e-5, Some(&gain), Some(&bias), true),
                    1 => group_norm_act_composite(&x, 32, 1e-5, Some(&gain), Some(&bias), true),
                    _ => x.group_norm(32, None::<Tensor>, None::<Tensor>, 1e-5, true),
                };
                // The composite promotes a bf16 map to float32 at the affine; the block casts back.
                // (tch has no backward with a given gradient: Σ y·dy costs each the same.)
                (y.to_kind(kind) * &dy).sum(Kind::Float).backward();
            };
            let mut times = [Vec::new(), Vec::new(), Vec::new()];
            for variant in 0..3 {
                step(variant);
            }
            for round in 0..rounds {
                // Who goes first rotates, so drift within a round hits each alike.
                for k in 0..3 {
                    let variant = (round + k) % 3;
                    times[variant].push(time_ms(&|| step(variant), 10));
                }
            }
            let [f, c, g] = times.map(|mut t| median(&mut t));
            println!(
                "{kind:?} {channels:>3} ch {size:>2} px: fused {f:6.2} ms, ATen ops {c:6.2} ms ({:.2}x), ATen GroupNorm alone {g:6.2} ms",
                c / f
            );
        }
    }
}
