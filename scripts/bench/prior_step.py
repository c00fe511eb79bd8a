"""The reference side of `cargo run --release -p unclip-prior --example bench_prior`: training steps
of diffusers' PriorTransformer (eager PyTorch, torch.optim.AdamW) on random inputs of the given
shape. Prints `samples_per_s <value>`.

With `--serve` it prints `ready`, then times turns on request: each line `N` on stdin runs N steps
and answers `seconds <value>` — so the bench can alternate a few steps of ours and of theirs many
times, and drifts in a shared machine's speed hit both alike.

UNCLIP_BENCH_TORCH_FUSED=1 builds the optimiser as torch.optim.AdamW(fused=True), the fused kernel
our runtime uses (the default, without it, is the single-tensor loop on CPU and foreach on CUDA).

Usage: prior_step.py HEADS HEAD_DIM LAYERS DIM TOKENS BATCH STEPS [DEVICE (cpu)] [--serve]
"""
import os
import sys
import time

import torch
from diffusers import PriorTransformer

serve = "--serve" in sys.argv
args = [a for a in sys.argv[1:] if a != "--serve"]
heads, head_dim, layers, dim, tokens, batch, steps = map(int, args[:7])
device = args[7] if len(args) > 7 else "cpu"
torch.manual_seed(0)
model = PriorTransformer(num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
                         embedding_dim=dim, num_embeddings=tokens).to(device).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                        fused=os.environ.get("UNCLIP_BENCH_TORCH_FUSED") == "1" or None)
x0 = torch.randn(batch, dim, device=device)
z_t = torch.randn(batch, dim, device=device)
feats = torch.randn(batch, tokens, dim, device=device)
mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
alphas = torch.cos((torch.arange(1000, device=device) / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2


def step():
    t = torch.randint(0, 1000, (batch,), device=device)
    a = alphas[t].unsqueeze(1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
    out = model(x_t, t, z_t, feats, mask).predicted_image_embedding
    loss = (out - x0).square().mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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


timed(3)
if serve:
    print("ready", flush=True)
    for line in sys.stdin:
        print(f"seconds {timed(int(line))}", flush=True)
else:
    print(f"samples_per_s {batch * steps / timed(steps):.1f}")
