"""Which held-out pairs a train-clip run gets wrong, read with transformers' CLIPModel (our weights
load into it by name): text->image top-1 among the first 64 shapes pairs with pairwise different
(colour, shape) object sets, as train-clip's held-out retrieval picks them, and for each miss the
caption, its scene and the scene the model chose. Give a training shard instead of the held-out
one to see how much of the held-out gap is memorisation.

Run: .venv/bin/python scripts/check/clip_misses.py RUN_DIR [SHARD.tar] [--ema]
(default shard: the run's data.held_out.shards, first shard; the newest checkpoint)
"""
import io
import json
import os
import sys
import tarfile

import numpy as np
import open_clip
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_tower import newest_checkpoint

args = [a for a in sys.argv[1:] if not a.startswith("--")]
run = args[0]
cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
ckpt = newest_checkpoint(run)
weights = load_file(os.path.join(ckpt, "ema.safetensors" if "--ema" in sys.argv else "model.safetensors"))
m, v, t = cfg["model"], cfg["model"]["vision"], cfg["model"]["text"]
act = m.get("activation", "quick_gelu")
config = CLIPConfig(
    text_config=dict(vocab_size=t.get("vocab_size", 49408), hidden_size=t["width"], num_hidden_layers=t["layers"],
                     num_attention_heads=t["heads"], intermediate_size=t.get("mlp_width", 4 * t["width"]),
                     max_position_embeddings=t.get("context_length", 77), hidden_act=act, eos_token_id=49407),
    vision_config=dict(image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["width"],
                       num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
                       intermediate_size=v.get("mlp_width", 4 * v["width"]), hidden_act=act),
    projection_dim=m["embed_dim"])
model = CLIPModel(config).eval()
model.load_state_dict(weights)

shard = args[1] if len(args) > 1 else cfg["data"]["held_out"]["shards"].split("{")[0] + "000000.tar"
if not os.path.exists(shard):
    shard = cfg["data"]["held_out"]["shards"]
samples = {}
with tarfile.open(shard) as tar:
    for member in tar.getmembers():
        key, ext = member.name.split(".", 1)
        samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
seen, picked = set(), []
for key in sorted(samples):
    s = samples[key]
    scene = json.loads(s["json"])
    signature = tuple(sorted((o["colour"], o["shape"]) for o in scene["objects"]))
    if signature not in seen:
        seen.add(signature)
        picked.append((s["txt"].decode(), scene, s["png"]))
    if len(picked) == 64:
        break

res = v["image_size"]
images = torch.stack([
    torch.from_numpy(np.array(Image.open(io.BytesIO(p[2])).convert("RGB").resize((res, res), Image.BICUBIC)))
    .permute(2, 0, 1).float() / 127.5 - 1 for p in picked])
ids = open_clip.get_tokenizer("ViT-B-32")([p[0] for p in picked], context_length=t.get("context_length", 77))
with torch.no_grad():
    img = torch.nn.functional.normalize(model.visual_projection(model.vision_model(pixel_values=images).pooler_output), dim=-1)
    txt = torch.nn.functional.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)
sim = txt @ img.T
n = len(picked)
hits = sim.argmax(1) == torch.arange(n)
print(f"{ckpt} on {shard}: text->image top-1 {hits.float().mean():.3f}, "
      f"image->text top-1 {(sim.argmax(0) == torch.arange(n)).float().mean():.3f} among {n}")


def describe(scene):
    return scene["background"] + ": " + ", ".join(f'{o["size"]} {o["colour"]} {o["shape"]}' for o in scene["objects"])


for i in range(n):
    j = sim[i].argmax().item()
    if j != i:
        print(f"{picked[i][0]!r}\n    true {describe(picked[i][1])} ({sim[i, i]:.3f})\n    took {describe(picked[j][1])} ({sim[i, j]:.3f})")
