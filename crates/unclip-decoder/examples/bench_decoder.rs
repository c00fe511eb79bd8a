//! Training-step throughput of the decoder here against diffusers' UnCLIP decoder
//! (`UnCLIPTextProjModel` + `UNet2DConditionModel`) in eager PyTorch
//! (scripts/bench/decoder_step.py): same architecture, loss (ε MSE + learned-range VLB), batch,
//! threads and machine. A step: timesteps and noise, q_sample, forward, hybrid loss, backward,
//! global-norm clipping, AdamW. Ours runs with the runtime's malloc settings
//! (`unclip_train::malloc`); diffusers once with glibc's defaults and once with the same
//! settings, each a long-lived `decoder_step.py --serve` process. The sides take turns of STEPS
//! steps, `UNCLIP_BENCH_ROUNDS` (15) rounds of one turn each, who goes first alternating; the
//! ratio is the median of the rounds' ratios, so that a shared machine's drifts in speed, which
//! last longer than a round, hit both sides alike. Run from the repository root:
//!
//!     cargo run --release -p unclip-decoder --example bench_decoder [-- CHANNELS LAYERS HEAD_DIM CLIP_DIM TOKENS RES BATCH STEPS]
//!
//! Defaults: the shapes decoder (configs/shapes/decoder.yaml: channels 32,64,128, 1 layer per
//! block, 32-wide heads, 128-wide CLIP, 24 caption tokens, 32 px), batch 32, 2 steps a turn.
//!
//! `UNCLIP_BENCH_UNFUSED=1` adds a turn per round of ours with the GroupNorm → scale-shift → SiLU
//! chains as ATen ops instead of the fused CPU kernel (`unclip_diffusion::nn::norm_act`), so one
//! run shows what the kernel buys.
//!
//! Ours updates with PyTorch's fused AdamW (`unclip_train::multi_tensor`); diffusers' side with
//! `torch.optim.AdamW`'s default, or its fused kernel too with `UNCLIP_BENCH_TORCH_FUSED=1`.
//!
//! `UNCLIP_BENCH_CHECKPOINTING=1` runs both sides with activation checkpointing (ours:
//! `UNet::set_gradient_checkpointing`, `decoder.gradient_checkpointing` in configs; diffusers':
//! `enable_gradient_checkpointing()`). On a CPU the bench also prints each side's step memory: the
//! peak resident memory over the three warm-up steps less the resident memory before them.
//!
//! `UNCLIP_BENCH_PRECISION=bf16` runs both sides' forward and loss under bf16 autocast. On CUDA
//! it also prints model-FLOPs utilisation: the matmul and convolution FLOPs of a step (counted by
//! torch.utils.flop_counter on the diffusers side; the architectures are the same) per second,
//! over the GPU's dense bf16 peak (from its name, or `UNCLIP_BENCH_PEAK_TFLOPS`).

use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};
use unclip_clip::caption::TextCondition;
use unclip_decoder::task::default_diffusion;
use unclip_decoder::{DecoderCondition, UNetConfig, UnclipDecoder};
use unclip_diffusion::nn::norm_act;
use unclip_diffusion::GaussianDiffusion;
use unclip_testkit::bench::{self, quartiles, ratio_row, ServedReference};
use unclip_train::optim::AdamW;
use unclip_train::precision::{self, Precision};
use unclip_train::TrainConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let channels: Vec<i64> = arg(0, "32,64,128")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let rest: Vec<i64> = ["1", "32", "128", "24", "32", "32", "2"]
        .iter()
        .enumerate()
        .map(|(i, d)| arg(i + 1, d).parse())
        .collect::<Result<_, _>>()?;
    let (layers, head_dim, clip_dim, tokens, res, batch, steps) = (
        rest[0], rest[1], rest[2], rest[3], rest[4], rest[5], rest[6],
    );
    unclip_diffusion::device::load_cuda_backend();
    let device = Device::cuda_if_available();
    let precision = match std::env::var("UNCLIP_BENCH_PRECISION").as_deref() {
        Ok("bf16") => Precision::Bf16,
        Ok("fp32") | Err(_) => Precision::Fp32,
        Ok(other) => return Err(format!("UNCLIP_BENCH_PRECISION={other}: fp32 or bf16").into()),
    };
    // As every trainer runs (unclip_train::malloc); diffusers runs with glibc's defaults.
    let tuned = unclip_train::malloc::retain_freed_memory();
    tch::manual_seed(0);
    let n = channels.len();
    let mut down = vec!["ResnetDownsampleBlock2D".to_string()];
    down.extend(vec!["SimpleCrossAttnDownBlock2D".to_string(); n - 1]);
    let mut up = vec!["SimpleCrossAttnUpBlock2D".to_string(); n - 1];
    up.push("ResnetUpsampleBlock2D".into());
    let unet = UNetConfig {
        in_channels: 3,
        out_channels: 6,
        block_out_channels: channels.clone(),
        down_block_types: down,
        up_block_types: up,
        layers_per_block: layers,
        cross_attention_dim: clip_dim,
        attention_head_dim: head_dim,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        dropout: 0.0,
        time_scale_shift: Default::default(),
    };
    let checkpointing =
        std::env::var("UNCLIP_BENCH_CHECKPOINTING").is_ok_and(|v| !v.is_empty() && v != "0");
    let vs = nn::VarStore::new(device);
    let mut model = UnclipDecoder::new(vs.root(), &unet, clip_dim, 4)?;
    model.unet.set_gradient_checkpointing(checkpointing);
    let mut opt = AdamW::new(&vs, &TrainConfig::default());
    let diffusion = GaussianDiffusion::new(&default_diffusion())?.to_device(device);
    let opts = (Kind::Float, device);
    let x0 = Tensor::rand([batch, 3, res, res], opts) * 2.0 - 1.0;
    let cond = DecoderCondition {
        image_embeds: Tensor::randn([batch, clip_dim], opts),
        text: TextCondition {
            text_embeds: Tensor::randn([batch, clip_dim], opts),
            tokens: Tensor::randn([batch, tokens, clip_dim], opts),
            mask: Tensor::ones([batch, tokens], (Kind::Bool, device)),
        },
    };
    let phases = std::cell::RefCell::new([0f64; 4]);
    let mut step = || -> Result<(), Box<dyn std::error::Error>> {
        let t0 = Instant::now();
        let t = diffusion.sample_timesteps(batch, device);
        let noise = x0.randn_like();
        let x_t = diffusion.q_sample(&x0, &t, &noise)?;
        let autocast = precision::autocast(device, precision);
        let out = model.forward_t(&x_t, &t, &cond, true)?.to_kind(Kind::Float);
        let t1 = Instant::now();
        let loss = diffusion
            .training_losses(&out, &x0, &x_t, &t, &noise)?
            .loss
            .mean(Kind::Float);
        drop(autocast);
        let t2 = Instant::now();
        opt.zero_grad()?;
        loss.backward();
        let t3 = Instant::now();
        let norm = opt.grad_norm()?;
        opt.clip_grad_norm(norm, 1.0)?;
        opt.step(1e-4)?;
        for (p, d) in phases
            .borrow_mut()
            .iter_mut()
            .zip([t1 - t0, t2 - t1, t3 - t2, t3.elapsed()])
        {
            *p += d.as_secs_f64();
        }
        Ok(())
    };
    let python = std::env::var("UNCLIP_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let channel_list: Vec<String> = channels.iter().map(i64::to_string).collect();
    let mut script_args = vec![channel_list.join(",")];
    script_args.extend(rest.iter().map(i64::to_string));
    script_args.push(bench::script_device(device).into());
    script_args.push(
        if precision == Precision::Bf16 {
            "bf16"
        } else {
            "fp32"
        }
        .into(),
    );
    if checkpointing {
        script_args.push("--checkpointing".into());
    }
    let script = "scripts/bench/decoder_step.py";
    let mut diffusers = ServedReference::spawn(&python, script, &script_args)?;
    // The same malloc settings, through glibc's environment tunables: how much of the lead is ours.
    let mut diffusers_tuned = if tuned && !device.is_cuda() {
        Some(ServedReference::spawn_with_our_malloc(
            &python,
            script,
            &script_args,
        )?)
    } else {
        None
    };

    let before = bench::resident_mib("VmRSS");
    for _ in 0..3 {
        step()?;
    }
    let step_memory = before
        .zip(bench::resident_mib("VmHWM"))
        .map(|(before, peak)| peak - before);
    let unfused = std::env::var_os("UNCLIP_BENCH_UNFUSED").is_some();
    let mut ours_turn = |fused: bool| -> Result<f64, Box<dyn std::error::Error>> {
        norm_act::set_fused_cpu(fused);
        bench::sync(device);
        let start = Instant::now();
        for _ in 0..steps {
            step()?;
        }
        bench::sync(device);
        Ok(start.elapsed().as_secs_f64())
    };
    let rounds = bench::rounds(15);
    let images_per_s = |seconds: f64| (batch * steps) as f64 / seconds;
    // Per round: images/s of ours, diffusers, diffusers with our malloc settings, ours unfused.
    let mut runs: Vec<[f64; 4]> = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (ours, theirs) = if round % 2 == 0 {
            let ours = ours_turn(true)?;
            (ours, diffusers.turn(steps)?)
        } else {
            let theirs = diffusers.turn(steps)?;
            (ours_turn(true)?, theirs)
        };
        let tuned = match diffusers_tuned.as_mut() {
            Some(reference) => images_per_s(reference.turn(steps)?),
            None => f64::NAN,
        };
        let ours_unfused = if unfused {
            images_per_s(ours_turn(false)?)
        } else {
            f64::NAN
        };
        runs.push([
            images_per_s(ours),
            images_per_s(theirs),
            tuned,
            ours_unfused,
        ]);
    }
    norm_act::set_fused_cpu(true);
    if std::env::var_os("UNCLIP_BENCH_PHASES").is_some() {
        // Three warm-up steps, then every turn of ours (fused and, with UNFUSED, not).
        let n = (3 + steps as usize * rounds * (1 + unfused as usize)) as f64;
        let phases = phases.borrow();
        eprintln!(
            "ours, ms per step: forward {:.1}, loss {:.1}, backward {:.1}, optimiser {:.1}",
            phases[0] / n * 1e3,
            phases[1] / n * 1e3,
            phases[2] / n * 1e3,
            phases[3] / n * 1e3
        );
    }
    println!(
        "decoder training step, channels {channel_list:?} × {layers} layers, {res} px, {tokens} tokens, batch {batch}, {rounds} rounds of {steps} steps a side, {} threads, {device:?}, {precision:?}{}",
        tch::get_num_threads(),
        if checkpointing { ", activation checkpointing" } else { "" }
    );
    if let (Some(ours), Some(theirs), false) = (
        step_memory,
        diffusers.info("step_memory_mib"),
        device.is_cuda(),
    ) {
        println!("step memory (peak resident less before the first step): ours {ours:.0} MiB, diffusers {theirs} MiB");
    }
    let column = |i: usize| runs.iter().map(|r| r[i]).collect::<Vec<_>>();
    let ratios = |num: usize, den: usize| runs.iter().map(|r| r[num] / r[den]).collect::<Vec<_>>();
    let (ours_rounds, theirs_rounds, tuned_rounds) = (column(0), column(1), column(2));
    let mut sides = vec![
        ("ours", &ours_rounds[..]),
        ("diffusers", &theirs_rounds[..]),
    ];
    if diffusers_tuned.is_some() {
        sides.push(("diffusers, our malloc", &tuned_rounds[..]));
    }
    bench::print_rounds("images/s", 1, &sides);
    let ours = quartiles(column(0))[1];
    println!("{:<36} {ours:>9.2}", "unclip-decoder");
    let mut compared = vec![("diffusers (eager PyTorch)", 1)];
    if diffusers_tuned.is_some() {
        compared.push(("diffusers with our malloc settings", 2));
    }
    // A row: the median images/s of one column and the rounds' ratio num / den.
    let row = |name: &str, images: usize, num: usize, den: usize| {
        println!("{}", ratio_row(name, column(images), ratios(num, den)));
    };
    for (name, i) in compared {
        row(name, i, 0, i);
    }
    if unfused {
        row("unclip-decoder, norm chains as ATen", 3, 3, 1);
        let [q1, median, q3] = quartiles(ratios(0, 3));
        println!("fused norm kernel: ours {median:.2}x ours with ATen chains (quartiles {q1:.2}–{q3:.2}x)");
    }
    let theirs = quartiles(column(1))[1];
    if device.is_cuda() {
        let flops: f64 = diffusers
            .info("flops_per_step")
            .ok_or("decoder_step.py printed no flops_per_step")?
            .parse()?;
        let name = diffusers.info("device_name").unwrap_or("unknown GPU");
        let peak = peak_bf16_flops(name)?;
        let mfu = |images_per_s: f64| flops * images_per_s / batch as f64 / peak;
        println!(
            "model FLOPs per step {:.3e}; {name}, dense bf16 peak {:.0} TFLOP/s",
            flops,
            peak / 1e12
        );
        println!(
            "MFU: unclip-decoder {:.1} %, diffusers {:.1} %",
            100.0 * mfu(ours),
            100.0 * mfu(theirs)
        );
    }
    Ok(())
}

/// The dense bf16 tensor-core peak of the GPU called `name` (NVIDIA's data sheets), or
/// `UNCLIP_BENCH_PEAK_TFLOPS`.
fn peak_bf16_flops(name: &str) -> Result<f64, Box<dyn std::error::Error>> {
    if let Ok(tflops) = std::env::var("UNCLIP_BENCH_PEAK_TFLOPS") {
        return Ok(tflops.parse::<f64>()? * 1e12);
    }
    let tflops = [
        ("H100 PCIe", 756.0),
        ("H100", 989.4),
        ("H200", 989.4),
        ("A100", 312.0),
        ("L40S", 362.1),
        ("A10G", 70.0),
        ("L4", 121.0),
    ]
    .iter()
    .find(|(key, _)| name.contains(key))
    .map(|(_, t)| *t)
    .ok_or_else(|| format!("no bf16 peak known for `{name}`: set UNCLIP_BENCH_PEAK_TFLOPS"))?;
    Ok(tflops * 1e12)
}
