//! Training-step throughput of the prior here against diffusers' `PriorTransformer` in eager
//! PyTorch (scripts/bench/prior_step.py), same shape, batch, threads and machine, one after the
//! other. A step: timesteps and noise, q_sample, forward, x0 MSE, backward, global-norm clipping,
//! AdamW. Run from the repository root:
//!
//!     cargo run --release -p unclip-prior --example bench_prior [-- HEADS HEAD_DIM LAYERS DIM TOKENS BATCH STEPS]
//!
//! Defaults: the shapes prior (2 × 64 heads, 4 layers, 128 wide, 24 tokens), batch 256, 20 steps.

use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};
use unclip_diffusion::GaussianDiffusion;
use unclip_prior::task::default_diffusion;
use unclip_prior::{init_prior_weights, DiffusionPrior, PriorConfig, TextCondition};
use unclip_train::optim::AdamW;
use unclip_train::TrainConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let defaults = [2, 64, 4, 128, 24, 256, 20];
    let v: Vec<i64> = (0..7)
        .map(|i| *args.get(i).unwrap_or(&defaults[i]))
        .collect();
    let (heads, head_dim, layers, dim, tokens, batch, steps) =
        (v[0], v[1], v[2], v[3], v[4], v[5], v[6]);
    let device = Device::cuda_if_available();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let cfg = PriorConfig {
        num_attention_heads: heads,
        attention_head_dim: head_dim,
        num_layers: layers,
        embedding_dim: dim,
        num_embeddings: tokens,
        ..Default::default()
    };
    let model = DiffusionPrior::new(vs.root(), &cfg)?;
    init_prior_weights(&vs, "");
    let train = TrainConfig {
        weight_decay: 0.05,
        ..Default::default()
    };
    let mut opt = AdamW::new(&vs, &train);
    let diffusion = GaussianDiffusion::new(&default_diffusion())?.to_device(device);
    let opts = (Kind::Float, device);
    let x0 = Tensor::randn([batch, dim], opts);
    let text = TextCondition {
        text_embeds: Tensor::randn([batch, dim], opts),
        tokens: Tensor::randn([batch, tokens, dim], opts),
        mask: Tensor::ones([batch, tokens], (Kind::Bool, device)),
    };
    let mut step = || -> Result<(), Box<dyn std::error::Error>> {
        let t = diffusion.sample_timesteps(batch, device);
        let noise = x0.randn_like();
        let x_t = diffusion.q_sample(&x0, &t, &noise)?;
        let out = model.forward_t(&x_t, &t, &text, true)?;
        let loss = diffusion
            .training_losses(&out, &x0, &x_t, &t, &noise)?
            .loss
            .mean(Kind::Float);
        opt.zero_grad()?;
        loss.backward();
        let norm = opt.grad_norm()?;
        opt.clip_grad_norm(norm, 1.0)?;
        opt.step(1e-4)?;
        Ok(())
    };
    for _ in 0..3 {
        step()?;
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let start = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let ours = (batch * steps) as f64 / start.elapsed().as_secs_f64();

    let python = std::env::var("UNCLIP_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let output = std::process::Command::new(python)
        .arg("scripts/bench/prior_step.py")
        .args(v.iter().map(|x| x.to_string()))
        .output()?;
    if !output.status.success() {
        return Err(format!("python failed: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    let text_out = String::from_utf8(output.stdout)?;
    let theirs: f64 = text_out
        .split_whitespace()
        .nth(1)
        .ok_or("no figure from python")?
        .parse()?;
    println!(
        "prior training step, {layers} × {} wide, {tokens} tokens, batch {batch}, {steps} steps, {} threads, {device:?}",
        heads * head_dim,
        tch::get_num_threads()
    );
    println!("{:<28} {:>12}", "", "samples/s");
    println!("{:<28} {ours:>12.1}", "unclip-prior");
    println!("{:<28} {theirs:>12.1}", "diffusers (eager PyTorch)");
    println!("{:<28} {:>11.2}x", "ratio", ours / theirs);
    Ok(())
}
