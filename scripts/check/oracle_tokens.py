"""Oracle conditioning for the shapes decoder: copies `embed --token-features` shards, replacing each
caption's token features with one token per object that holds its exact shape, colour and size
(one-hot), centre and rotation (as cos/sin of 3θ: the tilt is ±20°), from the scene's KEY.json. z_i
and z_t are kept. A decoder trained on them shows what the UNet learns when the conditioning states
the answer (docs/decoder-shapes.md: *With the answer given*).

Usage: .venv/bin/python scripts/check/oracle_tokens.py IMAGE_DIR EMB_DIR OUT_DIR
  (every EMB_DIR/*.tar, with IMAGE_DIR/<same name> for the scenes; then train with
  data.embedding_dir: OUT_DIR and score with shape_denoise.py on OUT_DIR's held-out shard)
"""
import os, sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rewrite_shards import npy_bytes, rewrite, scenes
from shape_probe import COLOURS, SHAPES

SIZES = ["small", "medium", "large"]
img_dir, emb_dir, out_dir = sys.argv[1:4]
dim = 128  # the shapes CLIP's text width, which the decoder's token projection reads


def oracle(shard, name, data):
    if not name.endswith(".txt_tokens.npy"):
        return data
    objects = scenes(img_dir, shard)[name[: -len(".txt_tokens.npy")]]["objects"]
    tok = np.zeros((len(objects), dim), np.float32)
    for i, o in enumerate(objects):
        tok[i, SHAPES.index(o["shape"])] = 3
        tok[i, 6 + COLOURS.index(o["colour"])] = 3
        tok[i, 14 + SIZES.index(o["size"])] = 3
        r = np.radians(o["rotation"])
        tok[i, 17:21] = [3 * (o["centre"][0] * 2 - 1), 3 * (o["centre"][1] * 2 - 1), 3 * np.cos(3 * r), 3 * np.sin(3 * r)]
    return npy_bytes(tok)


shards = rewrite(emb_dir, out_dir, oracle)
print(f"wrote {len(shards)} shards to {out_dir}")
