"""Copies `embed` shards with z_i and z_t multiplied by a factor (the token features as they are):
a way to try the decoder on embeddings of another scale without a config option (docs/decoder-shapes.md:
*What the decoder takes its shapes from*).

Usage: .venv/bin/python scripts/check/scale_embeddings.py SRC_DIR DST_DIR [FACTOR]
  FACTOR defaults to √(embedding width), which gives L2-normalised embeddings unit-scale components.
"""
import io, os, sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rewrite_shards import npy_bytes, rewrite

src_dir, dst_dir = sys.argv[1:3]
factor = float(sys.argv[3]) if len(sys.argv) > 3 else None


def scaled(_shard, name, data):
    if not name.endswith((".img_emb.npy", ".txt_emb.npy")):
        return data
    a = np.load(io.BytesIO(data))
    scale = factor if factor is not None else np.sqrt(a.shape[-1])
    return npy_bytes((a * scale).astype(a.dtype))


shards = rewrite(src_dir, dst_dir, scaled)
print(f"wrote {len(shards)} shards to {dst_dir}")
