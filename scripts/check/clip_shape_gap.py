"""How much the shapes CLIP's image embedding moves when only the objects' shapes change: the
held-out scenes redrawn (as the generator draws them) with every object a circle, or another shape
drawn at random, same colour, place, size and tilt; printed: the mean cosine of the redrawn
images' embeddings with the real ones' z_i and with the caption's z_t, against two unrelated
scenes' — what a CLIP score of decoder samples can and cannot tell (docs/decoder-shapes.md).

Usage: .venv/bin/python scripts/check/clip_shape_gap.py CLIP_RUN HELDOUT_SHARD.tar EMB_SHARD.tar [COUNT=256]
"""
import io, os, sys, tarfile
import numpy as np, torch
import torch.nn.functional as F
from PIL import Image
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_tower, diffusers_decoder, shape_score

run, heldout, emb = sys.argv[1:4]
count = int(sys.argv[4]) if len(sys.argv) > 4 else 256
torch.set_num_threads(2)
tower = clip_tower.load(run)
keys, scenes = shape_score.held_out_scenes(heldout, count)
with tarfile.open(heldout) as tar:
    real = np.stack([np.asarray(Image.open(io.BytesIO(tar.extractfile(k + ".png").read())).convert("RGB")) for k in keys])
zi, zt, _ = diffusers_decoder.stored_embeddings(emb, keys)
rng = np.random.default_rng(0)


def redraw(scene, circles):
    res = real.shape[1]
    img = np.ones((res, res, 3), np.float32) * np.array(scene["background_rgb"], np.float32)
    for o in scene["objects"]:
        shape = "circle" if circles else rng.choice([s for s in shape_score.SHAPES if s != o["shape"]])
        cov = shape_score.coverage(shape, o["centre"], o["radius"], o["rotation"], res)[..., None]
        img = img * (1 - cov) + cov * np.array(o["rgb"], np.float32)
    return img.round()


def embed(images):
    with torch.no_grad():
        return F.normalize(tower(clip_tower.pixels(tower, images)), dim=-1)


z_real = embed(real)
cos = lambda a, b: (a * b).sum(-1)
print(f"{count} held-out scenes: real image vs stored z_i {cos(z_real, zi).mean():.4f}; "
      f"unrelated scenes' z_i {cos(z_real.roll(1, 0), zi).mean():.4f}; real vs z_t {cos(z_real, zt).mean():.4f}")
for circles in (True, False):
    z = embed(np.stack([redraw(s, circles) for s in scenes]))
    print(f"{'every object a circle' if circles else 'every object another shape'}: cos with z_i "
          f"{cos(z, zi).mean():.4f}, with z_t {cos(z, zt).mean():.4f}; z_t closer to the real image "
          f"{(cos(z_real, zt) > cos(z, zt)).float().mean():.1%} of the time")
