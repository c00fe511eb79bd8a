"""The reference side of `cargo run --release -p unclip-decoder --example bench_decoder`: training
steps of diffusers' UnCLIP decoder (UnCLIPTextProjModel + UNet2DConditionModel as the UnCLIP
pipeline configures them, eager PyTorch, torch.optim.AdamW) on random inputs, with the same loss
as ours: ε MSE + the VLB term of the learned-range variance (improved DDPM's hybrid loss,
λ = 0.001 · T). Prints `images_per_s <value>`, then `flops_per_step <value>` (matmul and
convolution FLOPs of one forward + backward, from torch.utils.flop_counter: what model-FLOPs
utilisation counts) and `device_name <name>`.

With `--serve` it prints the FLOPs and device lines, then `ready`, and times turns on request: each
line `N` on stdin runs N steps and answers `seconds <value>` — so the bench can alternate a few
steps of ours and of theirs many times, and drifts in a shared machine's speed hit both alike.

UNCLIP_BENCH_TORCH_FUSED=1 builds the optimiser as torch.optim.AdamW(fused=True), the fused kernel
our runtime uses (the default, without it, is the single-tensor loop on CPU and foreach on CUDA).

With `--checkpointing` the UNet runs with `enable_gradient_checkpointing()` (diffusers' activation
checkpointing, as ours with `decoder.gradient_checkpointing`). On Linux it also prints
`step_memory_mib`: the peak resident memory over the warm-up steps less the resident memory before
them (activations, gradients, optimiser state), what the bench prints for ours too.

Usage: decoder_step.py CHANNELS(comma-separated) LAYERS HEAD_DIM CLIP_DIM TOKENS RESOLUTION BATCH STEPS DEVICE [bf16] [--serve] [--checkpointing]
"""
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

serve = "--serve" in sys.argv
checkpointing = "--checkpointing" in sys.argv
args = [a for a in sys.argv[1:] if a not in ("--serve", "--checkpointing")]
channels = [int(c) for c in args[0].split(",")]
layers, head_dim, clip_dim, tokens, res, batch, steps = map(int, args[1:8])
device = args[8]
bf16 = len(args) > 9 and args[9] == "bf16"
torch.manual_seed(0)
n = len(channels)
unet = UNet2DConditionModel(
    sample_size=res, in_channels=3, out_channels=6,
    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (n - 1),
    up_block_types=["SimpleCrossAttnUpBlock2D"] * (n - 1) + ["ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=channels,
    layers_per_block=layers, cross_attention_dim=clip_dim, attention_head_dim=head_dim,
    norm_num_groups=32, resnet_time_scale_shift="scale_shift", class_embed_type="identity").to(device).train()
if checkpointing:
    unet.enable_gradient_checkpointing()
proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=clip_dim,
                           time_embed_dim=4 * channels[0], cross_attention_dim=clip_dim).to(device).train()
params = list(unet.parameters()) + list(proj.parameters())
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0,
                        fused=os.environ.get("UNCLIP_BENCH_TORCH_FUSED") == "1" or None)

T = 1000
s = torch.arange(T + 1, dtype=torch.float64) / T
f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
acp = torch.cumprod(1 - betas, 0)
acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
post_var = betas * (1 - acp_prev) / (1 - acp)
post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
coef1 = betas * acp_prev.sqrt() / (1 - acp)
coef2 = (1 - acp_prev) * (1 - betas).sqrt() / (1 - acp)
tab = {k: v.float().to(device) for k, v in dict(
    sa=acp.sqrt(), s1a=(1 - acp).sqrt(), ra=(1 / acp).sqrt(), rm1=(1 / acp - 1).sqrt(), c1=coef1, c2=coef2,
    plv=post_logvar, lb=betas.log()).items()}


def g(name, t):
    return tab[name][t].view(-1, 1, 1, 1)


def cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_nll(x, mean, log_scale):
    c = x - mean
    inv = torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv * (c + 1 / 255)), cdf(inv * (c - 1 / 255))
    log_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus = (1 - cdf_min).clamp(min=1e-12).log()
    delta = cdf_plus - cdf_min
    lp = torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus, delta.clamp(min=1e-12).log()))
    return -lp


x0 = torch.rand(batch, 3, res, res, device=device) * 2 - 1
z_i = torch.randn(batch, clip_dim, device=device)
z_t = torch.randn(batch, clip_dim, device=device)
feats = torch.randn(batch, tokens, clip_dim, device=device)
mask = F.pad(torch.ones(batch, tokens, dtype=torch.bool, device=device), (4, 0), value=True)


def step():
    t = torch.randint(0, T, (batch,), device=device)
    noise = torch.randn_like(x0)
    x_t = g("sa", t) * x0 + g("s1a", t) * noise
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=bf16):
        ctx, add = proj(image_embeddings=z_i, prompt_embeds=z_t, text_encoder_hidden_states=feats,
                        do_classifier_free_guidance=False)
        out = unet(x_t, t, encoder_hidden_states=ctx, class_labels=add, attention_mask=mask).sample
    out = out.float()
    eps, v = out[:, :3], out[:, 3:]
    mse = (eps - noise).square().mean(dim=(1, 2, 3))
    frac = (v + 1) / 2
    model_logvar = frac * g("lb", t) + (1 - frac) * g("plv", t)
    pred_x0 = g("ra", t) * x_t - g("rm1", t) * eps.detach()
    model_mean = g("c1", t) * pred_x0 + g("c2", t) * x_t
    true_mean = g("c1", t) * x0 + g("c2", t) * x_t
    true_logvar = g("plv", t)
    kl = 0.5 * (-1 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2)
    nll = discretized_nll(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3)) / math.log(2)
    vb = torch.where(t == 0, nll, kl)
    loss = (mse + vb).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(n):
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - start


def report_flops():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    print(f"flops_per_step {counter.get_total_flops()}")
    print("device_name", torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", flush=True)


def resident_mib(field):
    """VmRSS (now) or VmHWM (the peak so far) from /proc/self/status, in MiB; None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


before = resident_mib("VmRSS")
timed(3)
if before is not None and not device.startswith("cuda"):
    print(f"step_memory_mib {resident_mib('VmHWM') - before:.1f}")
if serve:
    report_flops()
    print("ready", flush=True)
    for line in sys.stdin:
        print(f"seconds {timed(int(line))}", flush=True)
else:
    print(f"images_per_s {batch * steps / timed(steps):.2f}")
    report_flops()
