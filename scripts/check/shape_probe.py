"""Does a CLIP's image embedding carry the objects' shapes, or only their colours? A linear probe
(softmax regression on the z_i that `embed` wrote) predicts the shape and the colour of
single-object shapes scenes: fitted on training shards, scored on held-out ones. The same probe on
the caption's z_t and, where the shards have them (`embed --token-features`), its token features
(mean over the caption) says what the decoder's other conditioning signals carry. A ridge
regression on the same features says how much of the object's place (centre x, y) and size
(radius) they carry, as held-out R² (1: exact, 0: no better than the mean).

Run: .venv/bin/python scripts/check/shape_probe.py EMB_DIR TRAIN_SHARD... -- HELD_OUT_SHARD...
(image shards of the shapes dataset; their embeddings are EMB_DIR/<same file name>), e.g. after
  embed --clip runs/clip --shards 'data/shapes/clip64-{000000..000004}.tar' --out /tmp/emb
  embed --clip runs/clip --shards 'data/shapes/clipval64-{000000..000001}.tar' --out /tmp/emb
  scripts/check/shape_probe.py /tmp/emb data/shapes/clip64-00000{0,1,2,3,4}.tar -- data/shapes/clipval64-00000{0,1}.tar
"""
import io
import json
import os
import sys
import tarfile

import numpy as np
import torch

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"]


def members(path):
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def single_objects(emb_dir, shards):
    x, shape, colour, place = {}, [], [], []
    for shard in shards:
        scenes = members(shard)
        embs = members(os.path.join(emb_dir, os.path.basename(shard)))
        for key, e in sorted(embs.items()):
            objects = json.loads(scenes[key]["json"])["objects"]
            if len(objects) == 1:
                x.setdefault("z_i", []).append(np.load(io.BytesIO(e["img_emb.npy"])))
                x.setdefault("z_t", []).append(np.load(io.BytesIO(e["txt_emb.npy"])))
                if "txt_tokens.npy" in e:
                    tokens = np.load(io.BytesIO(e["txt_tokens.npy"])).astype(np.float32)
                    x.setdefault("caption tokens", []).append(tokens.mean(0))
                shape.append(SHAPES.index(objects[0]["shape"]))
                colour.append(COLOURS.index(objects[0]["colour"]))
                place.append([*objects[0]["centre"], objects[0]["radius"]])
    x = {k: torch.tensor(np.stack(v)).float() for k, v in x.items() if len(v) == len(shape)}
    return x, torch.tensor(shape), torch.tensor(colour), torch.tensor(place).float()


def probe(x_train, y_train, x_test, y_test, classes):
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    lin = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(1000):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(a), y_train) + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((lin(a).argmax(1) == y_train).float().mean().item(),
                (lin(b).argmax(1) == y_test).float().mean().item())


def regression_r2(x_train, y_train, x_test, y_test, ridge=1e-3):
    """Held-out R² of a ridge regression, one figure per target column."""
    a = torch.cat([x_train, torch.ones(len(x_train), 1)], 1)
    b = torch.cat([x_test, torch.ones(len(x_test), 1)], 1)
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1]), a.T @ y_train)
    residual = ((b @ w - y_test) ** 2).sum(0)
    return (1 - residual / ((y_test - y_test.mean(0)) ** 2).sum(0)).tolist()


if __name__ == "__main__":
    emb_dir, rest = sys.argv[1], sys.argv[2:]
    split = rest.index("--")
    xa, sa, ca, pa = single_objects(emb_dir, rest[:split])
    xb, sb, cb, pb = single_objects(emb_dir, rest[split + 1:])
    print(f"{emb_dir}: single-object scenes, {len(sa)} to fit, {len(sb)} held out")
    for signal in [k for k in xa if k in xb]:
        for name, ya, yb, n in [("shape", sa, sb, len(SHAPES)), ("colour", ca, cb, len(COLOURS))]:
            fit, held = probe(xa[signal], ya, xb[signal], yb, n)
            print(f"  {name:6} from {signal}: fitted {fit:.1%}, held out {held:.1%} (chance {1 / n:.1%})")
        x_r2, y_r2, r_r2 = regression_r2(xa[signal], pa, xb[signal], pb)
        print(f"  place from {signal}: held-out R² centre x {x_r2:.2f}, y {y_r2:.2f}; radius {r_r2:.2f}")
