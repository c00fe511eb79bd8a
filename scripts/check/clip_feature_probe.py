"""How much of an object's shape the shapes CLIP's ResNet image tower holds before its attention
pool: a linear probe (softmax regression, as shape_probe.py) of the shape of single-object scenes
from each stage's feature vector at the object's centre cell, and from stage 2's spatial mean.
Train: clip64-000000..4, test: clipval64-000000..1. VIA32=1 first takes the images to 32 px and
back (what the 32-px decoder's images hold). (docs/decoder-shapes.md: *With the answer given*.)

Usage: .venv/bin/python scripts/check/clip_feature_probe.py CLIP_RUN
"""
import io, json, os, sys, tarfile
import numpy as np, torch
from PIL import Image
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_tower
from shape_probe import SHAPES, probe

tower = clip_tower.load(sys.argv[1])


def load(shards):
    """Images, shapes and centres of the single-object scenes."""
    X, Y, C = [], [], []
    for sh in shards:
        with tarfile.open(sh) as t:
            for n in sorted(x for x in t.getnames() if x.endswith(".json")):
                objects = json.loads(t.extractfile(n).read())["objects"]
                if len(objects) != 1:
                    continue
                im = Image.open(io.BytesIO(t.extractfile(n[:-5] + ".png").read())).convert("RGB")
                if os.environ.get("VIA32"):
                    im = im.resize((32, 32), Image.BICUBIC).resize((64, 64), Image.BILINEAR)
                X.append(np.asarray(im))
                Y.append(objects[0]["shape"])
                C.append(objects[0]["centre"])
    return np.stack(X), np.array(Y), np.array(C)


def feats(X, C):
    """Each stage's feature vector at the object's centre cell, and stage 2's spatial mean."""
    out = {k: [] for k in clip_tower.STAGES + ["layer2_mean"]}
    for i in range(0, len(X), 256):
        c = C[i:i + 256]
        for k, h in zip(clip_tower.STAGES, clip_tower.stage_features(tower, X[i:i + 256])):
            s = h.shape[-1]
            ix, iy = (np.clip((c[:, j] * s).astype(int), 0, s - 1) for j in (0, 1))
            out[k].append(h[np.arange(len(c)), :, iy, ix].numpy())
            if k == "layer2":
                out["layer2_mean"].append(h.mean((2, 3)).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


d = "data/shapes"
Xtr, Ytr, Ctr = load([f"{d}/clip64-00000{i}.tar" for i in range(5)])
Xte, Yte, Cte = load([f"{d}/clipval64-00000{i}.tar" for i in range(2)])
Ftr, Fte = feats(Xtr, Ctr), feats(Xte, Cte)
labels = lambda ys: torch.tensor([SHAPES.index(y) for y in ys])
for k in Ftr:
    _, held = probe(torch.tensor(Ftr[k]).float(), labels(Ytr), torch.tensor(Fte[k]).float(), labels(Yte), len(SHAPES))
    print(f"{k} ({Ftr[k].shape[1]} features): shape from a linear probe {held:.1%} of {len(Yte)} held out")
