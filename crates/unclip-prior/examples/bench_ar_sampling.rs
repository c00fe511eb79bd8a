//! What the KV cache buys the autoregressive prior's sampling: the same draws, code by code, once
//! through the per-layer caches (`AutoregressivePrior::sample_codes`, one prefix pass and then
//! one-token steps) and once by re-running the full teacher-forced forward over everything drawn
//! so far for every code (what sampling without a cache costs). Greedy (near-zero temperature),
//! so both must pick the same codes — checked. Random weights; guided (scale 2), so each side
//! runs conditional and null rows together. Run from the repository root:
//!
//!     cargo run --release -p unclip-prior --example bench_ar_sampling [-- ROWS COMPONENTS LAYERS]
//!
//! `UNCLIP_BENCH_ROUNDS` (3) rounds of both, each figure the median. Defaults: the shapes prior (4 × 128 wide, 24 caption tokens, 40 components, 1024 buckets) and
//! 256 rows (128 held-out captions × 2 candidates, one evaluation's draws at one guidance scale).

use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};
use unclip_prior::{init_prior_weights, ArPriorConfig, AutoregressivePrior, TextCondition};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let arg = |i: usize, default: i64| *args.get(i).unwrap_or(&default);
    let (rows, components, layers) = (arg(0, 256), arg(1, 40), arg(2, 4));
    let device = Device::cuda_if_available();
    let cfg = ArPriorConfig {
        num_attention_heads: 2,
        attention_head_dim: 64,
        num_layers: layers,
        text_layers: 0,
        text_width: None,
        embedding_dim: 128,
        num_embeddings: 24,
        components,
        buckets: 1024,
        dot_buckets: 32,
        ..ArPriorConfig::default()
    };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let model = AutoregressivePrior::new(vs.root(), &cfg)?;
    init_prior_weights(&vs, "");
    let text = |n: i64| TextCondition {
        text_embeds: Tensor::randn([n, 128], (Kind::Float, device)),
        tokens: Tensor::randn([n, 24, 128], (Kind::Float, device)),
        mask: Tensor::arange(24, (Kind::Int64, device))
            .unsqueeze(0)
            .lt_tensor(&Tensor::randint_low(4, 25, [n, 1], (Kind::Int64, device))),
    };
    let (cond, null) = (text(rows), text(1));
    let dot = Tensor::full([rows], 28, (Kind::Int64, device));
    let scale = 2.0;
    let _g = tch::no_grad_guard();

    let nulls = null.index_select(&Tensor::zeros([rows], (Kind::Int64, device)))?;
    let both = cond.cat(&nulls)?;
    let dots = Tensor::cat(&[&dot, &dot.full_like(model.null_dot())], 0);
    let rounds: usize = std::env::var("UNCLIP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (mut cached_s, mut full_s, mut agree) = (Vec::new(), Vec::new(), 1.0f64);
    for _ in 0..rounds {
        let start = Instant::now();
        let (_, cached) = model.sample_codes(&cond, Some(&dot), &null, scale, 1e-6)?;
        cached_s.push(start.elapsed().as_secs_f64());

        // Without a cache: the full forward over the codes so far (the rest zeros) per code.
        let start = Instant::now();
        let codes = Tensor::zeros([2 * rows, components], (Kind::Int64, device));
        for i in 0..components {
            let (_, logits) = model.forward(&both, &dots, &codes)?;
            let logp = logits.select(1, i).log_softmax(-1, Kind::Float);
            let (c, u) = (logp.narrow(0, 0, rows), logp.narrow(0, rows, rows));
            let code = (&u + (c - &u) * scale).argmax(-1, false);
            codes.select(1, i).copy_(&Tensor::cat(&[&code, &code], 0));
        }
        full_s.push(start.elapsed().as_secs_f64());
        let same = cached.eq_tensor(&codes.narrow(0, 0, rows));
        agree = agree.min(
            same.to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]),
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (cached_s, full_s) = (median(&mut cached_s), median(&mut full_s));

    println!(
        "autoregressive prior sampling, {rows} rows × {components} codes, {layers} × 128 wide, guided, {} threads, {device:?}",
        tch::get_num_threads()
    );
    println!("{:<28} {:>10}", "", format!("seconds, median of {rounds}"));
    println!("{:<28} {cached_s:>10.3}", "KV cache (sample_codes)");
    println!("{:<28} {full_s:>10.3}", "full forward per code");
    println!("{:<28} {:>10.2}×", "speed-up", full_s / cached_s);
    println!("codes equal: {:.2} % (the worst round)", 100.0 * agree);
    Ok(())
}
