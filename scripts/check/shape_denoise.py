"""How well a `train-decoder` checkpoint keeps the shapes of real held-out scenes it is asked to
denoise: each image is noised to step t (fixed noise), brought back to t = 0 by deterministic DDIM
(25 steps) with the EMA weights in diffusers' UnCLIP decoder modules (strict loading: the names
match), and scored by shape_score.py. With (a) the scene's own z_i and caption and (b) another
scene's, so the gap is what the conditioning adds. Unlike sampling from pure noise this is above
chance early in training, so it compares decoder configs after a few hundred CPU-seconds of
training rather than at the end (docs/decoder-shapes.md).

Usage: .venv/bin/python scripts/check/shape_denoise.py CHECKPOINT_DIR GRID.png EMB_SHARD.tar \
           HELDOUT_SHARD.tar [T ...] [--mixed]
  CHECKPOINT_DIR: RUN/checkpoints/step-N (its RUN/config.yaml gives the UNet);
  GRID.png: a grid of the run's config whose top row is the held-out images (`--grid`, any count);
  EMB_SHARD.tar: the held-out shard's `embed --token-features` shard; T: noise steps (200 350 500);
  --mixed: also the scene's own z_i with another scene's caption, and the other way round (which of
  the two conditioning signals the shapes come from).
  --reshape: instead, the scenes redrawn with every object a circle (same colour, place and size), noised
  to each t and denoised with the scene's own conditioning: how many objects the conditioning turns
  into their real shape (in one-object scenes, where no binding of words to objects is needed, and
  in the others); a decoder that takes the shape from x_t alone keeps them circles.
  --sensitivity: instead, how far the clean-image estimate at each t moves, in mean |x0|, when z_i or the
  caption (z_t and token features) is swapped for another scene's: which signal the decoder uses.
  --null-image: every z_i is the learned null embedding (a caption-only decoder, trained with
  decoder.image_drop_prob near 1).
  --save: also write CHECKPOINT_DIR/denoise_tT.png, the real images above their denoisings from t with
  the own conditioning (t = 999: samples from pure noise), 3x.
Needs a v-prediction config with the cosine schedule over 1000 steps, as configs/shapes/decoder.yaml;
a self-conditioned one (`decoder.model.self_condition`) gets each step's x0 estimate, as train-decoder's
sampler gives it.
"""
import os, sys
import numpy as np, torch
from PIL import Image
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_decoder, shape_score

torch.set_num_threads(2)
FLAGS = ("--mixed", "--reshape", "--sensitivity", "--null-image", "--save")
mixed, reshape, sensitivity, null_image, save = (f in sys.argv for f in FLAGS)
args = [a for a in sys.argv[1:] if a not in FLAGS]
ckpt, grid_png, emb_tar, heldout_tar = args[:4]
steps = [int(a) for a in args[4:]] or [200, 350, 500]
cfg, unet, proj = diffusers_decoder.ema_modules(ckpt)
res = cfg["data"]["image"]["resolution"]
d = cfg["decoder"]["diffusion"]
assert (d.get("predict"), d.get("schedule"), d.get("timesteps")) == ("v", "cosine", 1000), \
    f"needs a v-prediction decoder on the cosine schedule over 1000 steps, not {d}"
self_condition = bool(cfg["decoder"]["model"].get("self_condition"))

grid = np.asarray(Image.open(grid_png).convert("RGB")).astype(np.float32) / 127.5 - 1
n = grid.shape[1] // res
x0 = torch.tensor(grid[:res]).reshape(res, n, res, 3).permute(1, 3, 0, 2).contiguous()
keys, scenes = shape_score.held_out_scenes(heldout_tar, n)
zi, zt, toks = diffusers_decoder.stored_embeddings(emb_tar, keys)
feats, mask = diffusers_decoder.padded_tokens(toks)
if null_image:
    zi[:] = proj.learned_classifier_free_guidance_embeddings.detach()

acp = diffusers_decoder.alphas_cumprod()

def condition(image_idx, caption_idx):
    """z_i of the scenes image_idx with the captions (z_t and token features) of caption_idx."""
    return diffusers_decoder.condition(cfg, proj, zi[image_idx], zt[caption_idx], feats[caption_idx],
                                       mask[caption_idx])

def noised(x, t):
    """x at noise step t with the fixed noise."""
    return acp[t].sqrt() * x + (1 - acp[t]).sqrt() * noise

def x0_estimate(x, t, cond, previous=None):
    """The EMA model's x0 estimate at step t (from its v output); a self-conditioned decoder (6 input
    channels) also sees its previous estimate, zeros on the first step."""
    ctx, add, attn = cond
    a = acp[t]
    with torch.no_grad():
        parts = (x, torch.zeros_like(x) if previous is None else previous) if self_condition else (x,)
        net_in = diffusers_decoder.network_input(cfg, *parts)
        v = unet(net_in, torch.full((n,), int(t)), encoder_hidden_states=ctx, class_labels=add,
                 attention_mask=attn).sample[:, :3]
    return a.sqrt() * x - (1 - a).sqrt() * v

def ddim(x, t0, cond, count=25):
    ts = np.linspace(t0, 0, count + 1).round().astype(int)
    x0_hat = None
    for a_t, b_t in zip(ts[:-1], ts[1:]):
        a = acp[a_t]
        x0_hat = x0_estimate(x, a_t, cond, x0_hat).clamp(-1, 1)
        eps = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
        b = acp[b_t] if b_t > 0 else torch.tensor(1.0)
        x = b.sqrt() * x0_hat + (1 - b).sqrt() * eps
    return x

def pairs(x, idx=range(n)):
    cells = ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    return [p for i in idx for p in shape_score.score(cells[i], scenes[i], res)]

def count(x):
    return shape_score.tally(pairs(x))

def as_circles(scene):
    """The scene redrawn (as the generator does, in sRGB 0..255) with every object a circle."""
    img = np.ones((res, res, 3), np.float32) * np.array(scene["background_rgb"], np.float32)
    for o in scene["objects"]:
        cov = shape_score.coverage("circle", o["centre"], o["radius"], 0, res)[..., None]
        img = img * (1 - cov) + cov * np.array(o["rgb"], np.float32)
    return img

print(f"{ckpt}: {n} held-out scenes; real images: {count(x0)}")
scene, another = torch.arange(n), torch.roll(torch.arange(n), 1)
own, other = condition(scene, scene), condition(another, another)
torch.manual_seed(0)
noise = torch.randn_like(x0)
for t in [] if reshape or sensitivity else steps:
    xt = noised(x0, t)
    out_own = ddim(xt, t, own)
    print(f"t={t}: own conditioning {count(out_own)} | another scene's {count(ddim(xt, t, other))}",
          flush=True)
    if save:
        # the real images above their denoisings with the own conditioning, 3x
        rows = torch.cat([x0, out_own.clamp(-1, 1)], 2)
        tiles = ((rows + 1) * 127.5).round().byte().permute(2, 0, 3, 1).reshape(2 * res, n * res, 3).numpy()
        path = os.path.join(ckpt, f"denoise_t{t}.png")
        Image.fromarray(tiles).resize((n * res * 3, 2 * res * 3), Image.NEAREST).save(path)
        print(f"wrote {path}", flush=True)
    if mixed:
        print(f"t={t}: own z_i, another's caption {count(ddim(xt, t, condition(scene, another)))} | "
              f"another's z_i, own caption {count(ddim(xt, t, condition(another, scene)))}", flush=True)

if reshape:
    circles = (torch.tensor(np.stack([as_circles(s) for s in scenes])).permute(0, 3, 1, 2) / 127.5 - 1).float()
    # Circles are already right; only the other shapes can show what the conditioning adds.
    one = [i for i, s in enumerate(scenes) if len(s["objects"]) == 1 and s["objects"][0]["shape"] != "circle"]
    rest = [i for i in range(n) if i not in one]
    non_circles = sum(o["shape"] != "circle" for i in rest for o in scenes[i]["objects"])
    for t in steps:
        out = ddim(noised(circles, t), t, own)
        right = lambda idx: sum(g == s != "circle" for s, g in pairs(out, idx))
        print(f"t={t}: circles turned into their real shape by the own conditioning: one-object scenes "
              f"{right(one)}/{len(one)}, other scenes {right(rest)}/{non_circles} "
              "(a decoder that keeps the circles: 0; shapes at random: 1 in 6)", flush=True)

if sensitivity:
    for t in steps:
        xt = noised(x0, t)
        base = x0_estimate(xt, t, own)
        moved = lambda cond: (x0_estimate(xt, t, cond) - base).abs().mean().item()
        print(f"t={t}: x0 estimate moves by {moved(condition(another, scene)):.4f} with another scene's z_i, "
              f"{moved(condition(scene, another)):.4f} with another scene's caption "
              f"(its error against the real image: {(base - x0).abs().mean().item():.4f})", flush=True)
