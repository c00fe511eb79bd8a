"""How much of an object's shape the shapes CLIP's ResNet image tower holds before its attention
pool: a linear probe (softmax regression, as shape_probe.py) of the shape of single-object scenes
from each stage's feature vector at the object's centre cell, and from stage 2's spatial mean.
Train: clip64-000000..4, test: clipval64-000000..1. VIA32=1 first takes the images to 32 px and
back (what the 32-px decoder's images hold). (README, Measured: *With the answer given*.)

Usage: .venv/bin/python scripts/check/clip_feature_probe.py CLIP_RUN
"""
import io, json, os, sys, tarfile
import numpy as np, torch, yaml
from PIL import Image
from safetensors.torch import load_file
from open_clip.modified_resnet import ModifiedResNet
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shape_probe import SHAPES, probe

run = sys.argv[1]
ccfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))["model"]; v = ccfg["vision"]
tower = ModifiedResNet(v["resnet_layers"], ccfg["embed_dim"], v["heads"], v["image_size"], v["width"])
ck = sorted(os.listdir(os.path.join(run, "checkpoints")))[-1]
sd = load_file(os.path.join(run, "checkpoints", ck, "ema.safetensors"))
tower.load_state_dict({k[len("visual."):]: t for k, t in sd.items() if k.startswith("visual.")})
tower.eval()
mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
def load(shards):
    X, Y, C = [], [], []
    for sh in shards:
        with tarfile.open(sh) as t:
            names = t.getnames()
            for n in sorted(x for x in names if x.endswith(".json")):
                j = json.loads(t.extractfile(n).read())
                if len(j["objects"]) != 1: continue
                o = j["objects"][0]
                im = Image.open(io.BytesIO(t.extractfile(n[:-5] + ".png").read())).convert("RGB")
                if os.environ.get("VIA32"):
                    im = im.resize((32, 32), Image.BICUBIC).resize((64, 64), Image.BILINEAR)
                X.append(np.asarray(im))
                Y.append(o["shape"]); C.append(o["centre"])
    return np.stack(X), np.array(Y), np.array(C)
def feats(X, C):
    out = {k: [] for k in ["layer1", "layer2", "layer3", "layer4", "layer2_mean"]}
    with torch.no_grad():
        for i in range(0, len(X), 256):
            x = (torch.tensor(X[i:i+256]).permute(0, 3, 1, 2).float() / 255 - mean) / std
            h = tower.stem(x)
            for k in ["layer1", "layer2", "layer3", "layer4"]:
                h = getattr(tower, k)(h)
                s = h.shape[-1]
                c = C[i:i+256]
                ix = np.clip((c[:, 0] * s).astype(int), 0, s - 1); iy = np.clip((c[:, 1] * s).astype(int), 0, s - 1)
                out[k].append(torch.stack([h[j, :, iy[j], ix[j]] for j in range(len(c))]).numpy())
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
