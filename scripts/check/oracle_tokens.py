"""Oracle conditioning for the shapes decoder: copies `embed --token-features` shards, replacing each
caption's token features with one token per object that holds its exact shape, colour and size
(one-hot), centre and rotation (as cos/sin of 3θ: the tilt is ±20°), from the scene's KEY.json. z_i
and z_t are kept. A decoder trained on them shows what the UNet learns when the conditioning states
the answer (README, Measured: *With the answer given*).

Usage: .venv/bin/python scripts/check/oracle_tokens.py IMAGE_DIR EMB_DIR OUT_DIR
  (every EMB_DIR/*.tar, with IMAGE_DIR/<same name> for the scenes; then train with
  data.embedding_dir: OUT_DIR and score with shape_denoise.py on OUT_DIR's held-out shard)
"""
import glob, io, json, os, sys, tarfile
import numpy as np
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"]
SIZES = ["small", "medium", "large"]
img_dir, emb_dir, out_dir = sys.argv[1:4]
dim = 128  # the shapes CLIP's text width, which the decoder's token projection reads
os.makedirs(out_dir, exist_ok=True)
for emb in sorted(glob.glob(os.path.join(emb_dir, "*.tar"))):
    img = os.path.join(img_dir, os.path.basename(emb))
    with tarfile.open(img) as ti:
        scenes = {n[:-5]: json.loads(ti.extractfile(n).read()) for n in ti.getnames() if n.endswith(".json")}
    with tarfile.open(emb) as te, tarfile.open(os.path.join(out_dir, os.path.basename(emb)), "w") as to:
        for m in te.getmembers():
            data = te.extractfile(m).read()
            if m.name.endswith(".txt_tokens.npy"):
                s = scenes[m.name[: -len(".txt_tokens.npy")]]
                tok = np.zeros((len(s["objects"]), dim), np.float32)
                for i, o in enumerate(s["objects"]):
                    tok[i, SHAPES.index(o["shape"])] = 3
                    tok[i, 6 + COLOURS.index(o["colour"])] = 3
                    tok[i, 14 + SIZES.index(o["size"])] = 3
                    r = np.radians(o["rotation"])
                    tok[i, 17:21] = [3 * (o["centre"][0] * 2 - 1), 3 * (o["centre"][1] * 2 - 1), 3 * np.cos(3 * r), 3 * np.sin(3 * r)]
                b = io.BytesIO(); np.save(b, tok); data = b.getvalue()
            info = tarfile.TarInfo(m.name); info.size = len(data); info.mtime = m.mtime
            to.addfile(info, io.BytesIO(data))
    print(os.path.basename(emb), flush=True)
