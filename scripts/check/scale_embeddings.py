"""Copies `embed` shards with z_i and z_t multiplied by a factor (the token features as they are):
a way to try the decoder on embeddings of another scale without a config option (README, Measured:
*What the decoder takes its shapes from*).

Usage: .venv/bin/python scripts/check/scale_embeddings.py SRC_DIR DST_DIR [FACTOR]
  FACTOR defaults to √(embedding width), which gives L2-normalised embeddings unit-scale components.
"""
import glob, io, os, sys, tarfile
import numpy as np

src_dir, dst_dir = sys.argv[1:3]
factor = float(sys.argv[3]) if len(sys.argv) > 3 else None
os.makedirs(dst_dir, exist_ok=True)
shards = sorted(glob.glob(os.path.join(src_dir, "*.tar")))
assert shards, f"no .tar shards in {src_dir}"
for path in shards:
    with tarfile.open(path) as src, tarfile.open(os.path.join(dst_dir, os.path.basename(path)), "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith((".img_emb.npy", ".txt_emb.npy")):
                a = np.load(io.BytesIO(data))
                scale = factor if factor is not None else np.sqrt(a.shape[-1])
                out = io.BytesIO()
                np.save(out, (a * scale).astype(a.dtype))
                data = out.getvalue()
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
print(f"wrote {len(shards)} shards to {dst_dir}")
