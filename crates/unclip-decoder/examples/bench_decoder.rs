//! Training-step throughput of the decoder here against diffusers' UnCLIP decoder
//! (`UnCLIPTextProjModel` + `UNet2DConditionModel`) in eager PyTorch
//! (scripts/bench/decoder_step.py): same architecture, loss (ε MSE + learned-range VLB), batch,
//! threads and machine, in alternating rounds (`UNCLIP_BENCH_ROUNDS`, 3; medians printed). A
//! step: timesteps and noise, q_sample, forward, hybrid loss, backward, global-norm clipping,
//! AdamW. Ours runs with the runtime's malloc settings (`unclip_train::malloc`); diffusers once
//! with glibc's defaults and once with the same settings. Run from the repository root:
//!
//!     cargo run --release -p unclip-decoder --example bench_decoder [-- CHANNELS LAYERS HEAD_DIM CLIP_DIM TOKENS RES BATCH STEPS]
//!
//! Defaults: the shapes decoder (configs/shapes/decoder.yaml: channels 32,64,128, 1 layer per
//! block, 32-wide heads, 128-wide CLIP, 24 caption tokens, 32 px), batch 32, 10 steps.
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
use unclip_diffusion::GaussianDiffusion;
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
    let rest: Vec<i64> = ["1", "32", "128", "24", "32", "32", "10"]
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
    };
    let vs = nn::VarStore::new(device);
    let model = UnclipDecoder::new(vs.root(), &unet, clip_dim, 4)?;
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
        opt.zero_grad();
        loss.backward();
        let t3 = Instant::now();
        let norm = opt.grad_norm();
        opt.clip_grad_norm(norm, 1.0);
        opt.step(1e-4);
        for (p, d) in phases
            .borrow_mut()
            .iter_mut()
            .zip([t1 - t0, t2 - t1, t3 - t2, t3.elapsed()])
        {
            *p += d.as_secs_f64();
        }
        Ok(())
    };
    let sync = || {
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
    };
    let python = std::env::var("UNCLIP_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let channel_list: Vec<String> = channels.iter().map(i64::to_string).collect();
    // (images/s, FLOPs per step, device name) from the reference script.
    type Reference = (f64, f64, String);
    let diffusers =
        |glibc_tunables: Option<&str>| -> Result<Reference, Box<dyn std::error::Error>> {
            let mut cmd = std::process::Command::new(&python);
            cmd.arg("scripts/bench/decoder_step.py")
                .arg(channel_list.join(","))
                .args(rest.iter().map(i64::to_string))
                .arg(if device.is_cuda() { "cuda" } else { "cpu" })
                .arg(if precision == Precision::Bf16 {
                    "bf16"
                } else {
                    "fp32"
                });
            if let Some(t) = glibc_tunables {
                cmd.env("GLIBC_TUNABLES", t);
            }
            let output = cmd.output()?;
            if !output.status.success() {
                return Err(
                    format!("python failed: {}", String::from_utf8_lossy(&output.stderr)).into(),
                );
            }
            let text_out = String::from_utf8(output.stdout)?;
            let value = |key: &str| -> Result<String, Box<dyn std::error::Error>> {
                Ok(text_out
                    .lines()
                    .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
                    .ok_or_else(|| format!("no {key} from python: {text_out}"))?)
            };
            Ok((
                value("images_per_s")?.parse()?,
                value("flops_per_step")?.parse()?,
                value("device_name")?,
            ))
        };
    // The same malloc settings, through glibc's environment tunables: how much of the lead is ours.
    let compare_tuned = tuned && !device.is_cuda();
    let tunables = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647";

    for _ in 0..3 {
        step()?;
    }
    // Rounds alternate ours and theirs so that drifts in the machine's speed hit both; medians.
    let rounds: usize = std::env::var("UNCLIP_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let (mut ours_runs, mut theirs_runs, mut tuned_runs) = (vec![], vec![], vec![]);
    let mut reference = None;
    for _ in 0..rounds.max(1) {
        sync();
        let start = Instant::now();
        for _ in 0..steps {
            step()?;
        }
        sync();
        ours_runs.push((batch * steps) as f64 / start.elapsed().as_secs_f64());
        if std::env::var_os("UNCLIP_BENCH_PHASES").is_some() {
            let n = (3 + steps as usize * ours_runs.len()) as f64;
            let phases = phases.borrow();
            eprintln!(
                "ours, ms per step: forward {:.1}, loss {:.1}, backward {:.1}, optimiser {:.1}",
                phases[0] / n * 1e3,
                phases[1] / n * 1e3,
                phases[2] / n * 1e3,
                phases[3] / n * 1e3
            );
        }
        let (images_per_s, flops, name) = diffusers(None)?;
        theirs_runs.push(images_per_s);
        reference = Some((flops, name));
        if compare_tuned {
            tuned_runs.push(diffusers(Some(tunables))?.0);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let runs = format!(
        "ours {} | diffusers {} | diffusers, our malloc {}",
        show(&ours_runs),
        show(&theirs_runs),
        show(&tuned_runs)
    );
    let ours = median(&mut ours_runs);
    let theirs = median(&mut theirs_runs);
    let theirs_tuned = (!tuned_runs.is_empty()).then(|| median(&mut tuned_runs));
    println!(
        "decoder training step, channels {channel_list:?} × {layers} layers, {res} px, {tokens} tokens, batch {batch}, {steps} steps, {} threads, {device:?}, {precision:?}",
        tch::get_num_threads()
    );
    println!("rounds (images/s): {runs}");
    println!(
        "{:<44} {:>9} {:>7}",
        "median of rounds", "images/s", "ratio"
    );
    println!("{:<44} {ours:>9.2}", "unclip-decoder");
    println!(
        "{:<44} {theirs:>9.2} {:>6.2}x",
        "diffusers (eager PyTorch)",
        ours / theirs
    );
    if let Some(t) = theirs_tuned {
        println!(
            "{:<44} {t:>9.2} {:>6.2}x",
            "diffusers with our malloc settings",
            ours / t
        );
    }
    if let (true, Some((flops, name))) = (device.is_cuda(), reference) {
        let peak = peak_bf16_flops(&name)?;
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
