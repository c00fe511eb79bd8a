"""Sampling-time levers on a `train-decoder` checkpoint, scored like its samples: the 64 held-out
scenes sampled from pure noise (fixed seed, deterministic DDIM by default) with the EMA weights in
diffusers' modules, each object's shape counted by shape_score.py. Which guidance:

  --cfg MODE SCALE   classifier-free guidance against MODE: `both` (learned null z_i and the empty
                     caption, train-decoder's guidance), `caption` (own z_i, empty caption: the
                     caption's pull alone) or `image` (null z_i, own caption)
  --auto CKPT SCALE  autoguidance (Karras et al. 2024): the same conditioning through a weaker
                     checkpoint (an earlier one of the same run) as the guiding branch
  --clip RUN SCALE   CLIP guidance: each step's x0 estimate moved SCALE (pixel RMS, [-1, 1] units)
                     up the gradient of cos(CLIP(x0), z_i), with the run's (noise-free) image tower

Usage: .venv/bin/python scripts/check/guided_samples.py CKPT EMB_SHARD.tar HELDOUT_SHARD.tar \
           NULL_EMB.tar [--cfg MODE S | --auto CKPT S | --clip RUN S] [--steps 50] [--eta 0] [--save PNG]
  NULL_EMB.tar: `embed --token-features` of a one-sample shard with an empty caption (as for
  decoder_reference_train.py). Needs a v-prediction decoder on the cosine schedule, as shape_denoise.py.
(docs/decoder-shapes.md: *Sampling-time levers*.)
"""
import argparse, os, sys, tarfile
import numpy as np, torch
import torch.nn.functional as F
from PIL import Image
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_decoder, shape_score

ap = argparse.ArgumentParser()
for name in ("ckpt", "emb", "heldout", "null_emb"):
    ap.add_argument(name)
group = ap.add_mutually_exclusive_group()
group.add_argument("--cfg", nargs=2, metavar=("MODE", "SCALE"))
group.add_argument("--auto", nargs=2, metavar=("CKPT", "SCALE"))
group.add_argument("--clip", nargs=2, metavar=("RUN", "SCALE"))
ap.add_argument("--steps", type=int, default=50)
ap.add_argument("--eta", type=float, default=0.0, help="DDIM's eta: 0 deterministic, 1 ancestral")
ap.add_argument("--save", help="write the first 16 samples here, 3x")
a = ap.parse_args()
torch.set_num_threads(2)
n = 64
cfg, unet, proj = diffusers_decoder.ema_modules(a.ckpt)
res = cfg["data"]["image"]["resolution"]
d = cfg["decoder"]["diffusion"]
assert (d.get("predict"), d.get("schedule")) == ("v", "cosine"), f"needs a v-prediction cosine decoder, not {d}"
keys, scenes = shape_score.held_out_scenes(a.heldout, n)
zi, zt, toks = diffusers_decoder.stored_embeddings(a.emb, keys)
with tarfile.open(a.null_emb) as tar:
    null_key = sorted(x for x in tar.getnames() if x.endswith(".txt_emb.npy"))[0][: -len(".txt_emb.npy")]
_, null_zt, null_tok = diffusers_decoder.stored_embeddings(a.null_emb, [null_key])
null_zt, null_tok = null_zt.expand(n, -1), null_tok[0]
L = max(len(t) for t in toks + [null_tok])
feats, mask = diffusers_decoder.padded_tokens(toks, L)
null_feats, null_mask = diffusers_decoder.padded_tokens([null_tok] * n, L)

own = diffusers_decoder.condition(cfg, proj, zi, zt, feats, mask)
guide_net, guide_cond, scale = unet, None, 1.0
if a.cfg:
    null_zi = proj.learned_classifier_free_guidance_embeddings.detach().expand(n, -1)
    mode, scale = a.cfg[0], float(a.cfg[1])
    guide_cond = {"both": (null_zi, null_zt, null_feats, null_mask), "caption": (zi, null_zt, null_feats, null_mask),
                  "image": (null_zi, zt, feats, mask)}[mode]
    guide_cond = diffusers_decoder.condition(cfg, proj, *guide_cond)
elif a.auto:
    _, guide_net, weak_proj = diffusers_decoder.ema_modules(a.auto[0])
    guide_cond, scale = diffusers_decoder.condition(cfg, weak_proj, zi, zt, feats, mask), float(a.auto[1])
elif a.clip:
    import clip_tower
    tower, step_size = clip_tower.load(a.clip[0]), float(a.clip[1])
    for p in tower.parameters():
        p.requires_grad_(False)


def clip_step(x0):
    """x0 moved step_size (per-image RMS) up the gradient of cos(CLIP(x0), z_i)."""
    x0 = x0.detach().requires_grad_(True)
    up = F.interpolate(x0, size=tower.image_size, mode="bilinear", align_corners=False)
    pixels = clip_tower.pixels(tower, (up + 1) * 127.5, channels_last=False)
    cos = (F.normalize(tower(pixels), dim=-1) * zi).sum()
    g, = torch.autograd.grad(cos, x0)
    return (x0 + step_size * g / (g.pow(2).mean((1, 2, 3), keepdim=True).sqrt() + 1e-12)).detach()


acp = diffusers_decoder.alphas_cumprod(d.get("timesteps", 1000))


def v_of(net, x, t, cond):
    ctx, add, attn = cond
    with torch.no_grad():
        return net(x, torch.full((n,), int(t)), encoder_hidden_states=ctx, class_labels=add,
                   attention_mask=attn).sample[:, :3]


torch.manual_seed(0)
x = torch.randn(n, 3, res, res)
ts = np.linspace(len(acp) - 1, 0, a.steps + 1).round().astype(int)
for t, s in zip(ts[:-1], ts[1:]):
    at, as_ = acp[t], (acp[s] if s > 0 else torch.tensor(1.0))
    v = v_of(unet, x, t, own)
    if guide_cond is not None and scale != 1.0:
        v_guide = v_of(guide_net, x, t, guide_cond)
        v = v_guide + scale * (v - v_guide)
    x0 = (at.sqrt() * x - (1 - at).sqrt() * v).clamp(-1, 1)
    if a.clip:
        x0 = clip_step(x0).clamp(-1, 1)
    eps = (x - at.sqrt() * x0) / (1 - at).sqrt()
    sigma = a.eta * ((1 - as_) / (1 - at) * (1 - at / as_)).sqrt() if s > 0 else torch.tensor(0.0)
    x = as_.sqrt() * x0 + (1 - as_ - sigma ** 2).sqrt() * eps + sigma * torch.randn_like(x)

cells = ((x.clamp(-1, 1) + 1) * 127.5).round()
pairs = [p for i in range(n) for p in shape_score.score(cells[i].permute(1, 2, 0).numpy(), scenes[i], res)]
how = f"cfg {a.cfg}" if a.cfg else f"autoguidance {a.auto}" if a.auto else f"CLIP guidance {a.clip}" if a.clip else "unguided"
print(f"{a.ckpt}, {how}, DDIM {a.steps} steps eta {a.eta}: {shape_score.tally(pairs)}", flush=True)
if a.save:
    tiles = cells[:16].byte().permute(2, 0, 3, 1).reshape(res, 16 * res, 3).numpy()
    Image.fromarray(tiles).resize((16 * res * 3, res * 3), Image.NEAREST).save(a.save)
