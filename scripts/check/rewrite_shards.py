"""Copies every .tar shard of a directory into another, passing each member's bytes through
`change(shard, name, data)` (shard: the source shard's path); the member headers are kept. Shared by the scripts that derive embedding
shards (scale_embeddings.py, oracle_tokens.py, oracle_embeddings.py)."""
import functools, glob, io, json, os, tarfile
import numpy as np


def rewrite(src_dir, dst_dir, change):
    """Returns the shard paths read."""
    os.makedirs(dst_dir, exist_ok=True)
    shards = sorted(glob.glob(os.path.join(src_dir, "*.tar")))
    assert shards, f"no .tar shards in {src_dir}"
    for path in shards:
        with tarfile.open(path) as src, tarfile.open(os.path.join(dst_dir, os.path.basename(path)), "w") as dst:
            for member in src.getmembers():
                data = change(path, member.name, src.extractfile(member).read())
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    return shards


def npy_bytes(array):
    """An array as the bytes of a .npy file."""
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


@functools.lru_cache(maxsize=1)
def scenes(img_dir, emb_shard):
    """The KEY.json scenes of the image shard in `img_dir` that an embedding shard belongs to (same
    file name); shards are rewritten one at a time, so the last one read is kept."""
    with tarfile.open(os.path.join(img_dir, os.path.basename(emb_shard))) as t:
        return {n[:-5]: json.loads(t.extractfile(n).read()) for n in t.getnames() if n.endswith(".json")}
