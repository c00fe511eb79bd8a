//! Training-step throughput of the prior here against diffusers' `PriorTransformer` in eager
//! PyTorch (scripts/bench/prior_step.py), same shape, batch, threads and machine. A step:
//! timesteps and noise, q_sample, forward, x0 MSE, backward, global-norm clipping, AdamW. The
//! sides take turns of STEPS steps against a long-lived `prior_step.py --serve` process,
//! `UNCLIP_BENCH_ROUNDS` (15) rounds, who goes first alternating; the ratio is the median of the
//! rounds' ratios with its quartiles (as the decoder's bench). Ours runs with the runtime's malloc
//! settings (`unclip_train::malloc`), as `train-prior` does; diffusers once with glibc's defaults
//! and, on CPU, once with the same settings. Run from the repository root:
//!
//!     cargo run --release -p unclip-prior --example bench_prior [-- HEADS HEAD_DIM LAYERS DIM TOKENS BATCH STEPS]
//!
//! Defaults: the shapes prior (2 × 64 heads, 4 layers, 128 wide, 24 tokens), batch 256, 4 steps
//! a turn. Ours updates with PyTorch's fused AdamW; diffusers' side with `torch.optim.AdamW`'s
//! default, or its fused kernel too with `UNCLIP_BENCH_TORCH_FUSED=1`. Both sides run on the first
//! GPU where there is one (fp32), else on the CPU.

use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};
use unclip_diffusion::GaussianDiffusion;
use unclip_prior::task::default_diffusion;
use unclip_prior::{init_prior_weights, DiffusionPrior, PriorConfig, TextCondition};
use unclip_testkit::bench::{self, quartiles, ratio_row, ServedReference};
use unclip_train::optim::AdamW;
use unclip_train::TrainConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let defaults = [2, 64, 4, 128, 24, 256, 4];
    let v: Vec<i64> = (0..7)
        .map(|i| *args.get(i).unwrap_or(&defaults[i]))
        .collect();
    let (heads, head_dim, layers, dim, tokens, batch, steps) =
        (v[0], v[1], v[2], v[3], v[4], v[5], v[6]);
    let device = Device::cuda_if_available();
    // As every trainer runs; diffusers runs with glibc's defaults, and once with the same settings.
    let tuned = unclip_train::malloc::retain_freed_memory();
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
    let python = std::env::var("UNCLIP_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let mut script_args: Vec<String> = v.iter().map(i64::to_string).collect();
    script_args.push(bench::script_device(device).into());
    let script = "scripts/bench/prior_step.py";
    let mut diffusers = ServedReference::spawn(&python, script, &script_args)?;
    let mut diffusers_tuned = if tuned && !device.is_cuda() {
        Some(ServedReference::spawn_with_our_malloc(
            &python,
            script,
            &script_args,
        )?)
    } else {
        None
    };
    for _ in 0..3 {
        step()?;
    }
    let mut ours_turn = || -> Result<f64, Box<dyn std::error::Error>> {
        bench::sync(device);
        let start = Instant::now();
        for _ in 0..steps {
            step()?;
        }
        bench::sync(device);
        Ok(start.elapsed().as_secs_f64())
    };
    let rounds = bench::rounds(15);
    let per_s = |seconds: f64| (batch * steps) as f64 / seconds;
    let (mut ours, mut theirs, mut theirs_tuned) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            ours.push(per_s(ours_turn()?));
            theirs.push(per_s(diffusers.turn(steps)?));
        } else {
            theirs.push(per_s(diffusers.turn(steps)?));
            ours.push(per_s(ours_turn()?));
        }
        if let Some(reference) = diffusers_tuned.as_mut() {
            theirs_tuned.push(per_s(reference.turn(steps)?));
        }
    }
    println!(
        "prior training step, {layers} × {} wide, {tokens} tokens, batch {batch}, {rounds} rounds of {steps} steps a side, {} threads, {device:?}",
        heads * head_dim,
        tch::get_num_threads()
    );
    let mut sides = vec![("ours", &ours[..]), ("diffusers", &theirs[..])];
    if !theirs_tuned.is_empty() {
        sides.push(("diffusers, our malloc", &theirs_tuned[..]));
    }
    bench::print_rounds("samples/s", 0, &sides);
    println!("{:<36} {:>9.2}", "unclip-prior", quartiles(ours.clone())[1]);
    let ratios = |reference: &[f64]| ours.iter().zip(reference).map(|(a, b)| a / b).collect();
    println!(
        "{}",
        ratio_row("diffusers (eager PyTorch)", theirs.clone(), ratios(&theirs))
    );
    if !theirs_tuned.is_empty() {
        let row = ratio_row(
            "diffusers with our malloc settings",
            theirs_tuned.clone(),
            ratios(&theirs_tuned),
        );
        println!("{row}");
    }
    Ok(())
}
