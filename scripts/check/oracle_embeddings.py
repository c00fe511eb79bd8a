"""Oracle global conditioning for the shapes decoder: copies `embed` shards, replacing each caption's
z_t with a vector that states which (colour, shape) pairs the scene holds (one-hot counts, dims
0-47) and its shapes (counts, dims 48-53), at unit-scale components (×3). z_i and the token features
are kept. z_t is added to the timestep embedding, as a class is in class-conditional ADM, so a
decoder trained on these shards shows how fast the UNet learns shapes from a global vector that
carries them all — the route a shape-aware CLIP image embedding would take (docs/decoder-shapes.md).

Usage: .venv/bin/python scripts/check/oracle_embeddings.py IMAGE_DIR EMB_DIR OUT_DIR
"""
import io, os, sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rewrite_shards import npy_bytes, rewrite, scenes
from shape_probe import COLOURS, SHAPES

img_dir, emb_dir, out_dir = sys.argv[1:4]


def oracle(shard, name, data):
    if not name.endswith(".txt_emb.npy"):
        return data
    z = np.load(io.BytesIO(data))
    v = np.zeros_like(z, dtype=np.float32)
    for o in scenes(img_dir, shard)[name[: -len(".txt_emb.npy")]]["objects"]:
        s = SHAPES.index(o["shape"])
        v[COLOURS.index(o["colour"]) * len(SHAPES) + s] += 3
        v[48 + s] += 3
    return npy_bytes(v.astype(z.dtype))


print(f"wrote {len(rewrite(emb_dir, out_dir, oracle))} shards to {out_dir}")
