"""The reference side of `cargo run --release -p unclip-prior --example bench_prior`: training steps
of diffusers' PriorTransformer (eager PyTorch, torch.optim.AdamW) on random inputs of the given
shape. Prints `samples_per_s <value>`.

Usage: prior_step.py HEADS HEAD_DIM LAYERS DIM TOKENS BATCH STEPS
"""
import sys
import time

import torch
from diffusers import PriorTransformer

heads, head_dim, layers, dim, tokens, batch, steps = map(int, sys.argv[1:8])
torch.manual_seed(0)
model = PriorTransformer(num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
                         embedding_dim=dim, num_embeddings=tokens).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
x0 = torch.randn(batch, dim)
z_t = torch.randn(batch, dim)
feats = torch.randn(batch, tokens, dim)
mask = torch.ones(batch, tokens, dtype=torch.bool)
alphas = torch.cos((torch.arange(1000) / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2


def step():
    t = torch.randint(0, 1000, (batch,))
    a = alphas[t].unsqueeze(1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
    out = model(x_t, t, z_t, feats, mask).predicted_image_embedding
    loss = (out - x0).square().mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(f"samples_per_s {batch * steps / (time.perf_counter() - start):.1f}")
