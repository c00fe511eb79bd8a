"""Model-free shape score of decoded shapes scenes: for every object of a held-out scene, which of
the six shapes the sample drew for it, wherever the decoder put it.

Every pixel takes the nearest of the background and the eight object colours; each object of the
scene takes the nearest connected region of its colour (none: missing); the region's shape is the
one whose drawing (the generator's signed distances, any of its 3 sizes and rotations of -20..20
degrees, on the region's centroid) overlaps it best. Row 0 of the grid, the real images, checks
the scorer itself.

Usage: .venv/bin/python scripts/check/shape_score.py GRID.png HELDOUT_SHARD.tar [--res 32] [--detail]
  GRID.png: a `train-decoder` grid (top row: the first held-out images; then one row per guidance
  scale) or any grid of the same layout; HELDOUT_SHARD.tar: the shard they came from (its .json).
"""
import argparse, json, tarfile
import numpy as np
from PIL import Image
from scipy import ndimage

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond"]


def length(x, y):
    return np.sqrt(x * x + y * y)


def sdf(shape, x, y, r):
    """crates/unclip-data/src/shapes.rs signed_distance, vectorised (y up, negative inside)."""
    if shape == "circle":
        return length(x, y) - r
    if shape in ("square", "diamond"):
        if shape == "diamond":
            c = np.sqrt(0.5)
            x, y = c * (x - y), c * (x + y)
        s = r * np.sqrt(0.5)
        dx, dy = np.abs(x) - s, np.abs(y) - s
        return length(np.maximum(dx, 0), np.maximum(dy, 0)) + np.minimum(np.maximum(dx, dy), 0)
    if shape == "triangle":
        k = np.sqrt(3.0)
        h = r * k / 2
        px, py = np.abs(x) - h, y + h / k
        flip = px + k * py > 0
        px, py = np.where(flip, (px - k * py) / 2, px), np.where(flip, (-k * px - py) / 2, py)
        px = px - np.clip(px, -2 * h, 0)
        return -length(px, py) * np.sign(py)
    if shape == "star":
        k1x, k1y = 0.809017, -0.587785
        k2x, k2y = -k1x, k1y
        px, py = np.abs(x), y
        d1 = 2 * np.maximum(k1x * px + k1y * py, 0)
        px, py = px - d1 * k1x, py - d1 * k1y
        d2 = 2 * np.maximum(k2x * px + k2y * py, 0)
        px, py = px - d2 * k2x, py - d2 * k2y
        px = np.abs(px)
        py = py - r
        rf = 0.45
        bax, bay = rf * -k1y, rf * k1x - 1
        h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0, r)
        return length(px - bax * h, py - bay * h) * np.sign(py * bax - px * bay)
    if shape == "hexagon":
        kx, ky, kz = -0.8660254, 0.5, 0.5773503
        ri = r * 0.8660254
        px, py = np.abs(x), np.abs(y)
        d = 2 * np.minimum(kx * px + ky * py, 0)
        px, py = px - d * kx, py - d * ky
        px = px - np.clip(px, -kz * ri, kz * ri)
        py = py - ri
        return length(px, py) * np.sign(py)
    raise ValueError(shape)


def coverage(shape, centre, radius, rotation, res):
    """Pixel coverage in [0, 1] of one object, as the generator renders it."""
    p = (np.arange(res) + 0.5) / res
    x = p[None, :] - centre[0]
    y = centre[1] - p[:, None]
    s, c = np.sin(-np.radians(rotation)), np.cos(-np.radians(rotation))
    rx, ry = c * x - s * y, s * x + c * y
    return np.clip(0.5 - sdf(shape, rx, ry, radius) * res, 0, 1)


PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "pink": (240, 120, 180), "cyan": (40, 200, 210),
}
RADII = (0.09, 0.14, 0.19)


def components(cell, scene):
    """Connected regions of each object colour: every pixel takes the nearest of the background
    and the eight object colours (a decoded colour is seldom exact)."""
    names = ["background"] + list(PALETTE)
    colours = np.array([scene["background_rgb"]] + list(PALETTE.values()), np.float32)
    nearest = ((cell[:, :, None, :] - colours) ** 2).sum(-1).argmin(-1)
    found = {}
    for i, name in enumerate(names[1:], 1):
        labels, count = ndimage.label(nearest == i)
        found[name] = [labels == k for k in range(1, count + 1) if (labels == k).sum() >= 2]
    return found


def classify(mask, res):
    """The shape (and its IoU) whose drawing, at any of the generator's sizes and rotations, centred
    on the region's centroid give or take half a pixel, overlaps the region best."""
    cy, cx = ndimage.center_of_mass(mask)
    best_shape, best = None, -1.0
    for shape in SHAPES:
        for r in RADII:
            for rot in [0] if shape == "circle" else range(-20, 21, 5):
                for dx in (-0.5, 0, 0.5):
                    for dy in (-0.5, 0, 0.5):
                        c = [(cx + 0.5 + dx) / res, (cy + 0.5 + dy) / res]
                        m = coverage(shape, c, r, rot, res) >= 0.5
                        iou = (m & mask).sum() / max((m | mask).sum(), 1)
                        if iou > best:
                            best_shape, best = shape, iou
    return best_shape, best


def score(cell, scene, res, offsets=None):
    """[(true shape, sample's shape or None if missing)] for the scene's objects. Each object takes
    the nearest unclaimed region of its colour, wherever the decoder put it; `offsets`, if a list,
    gets each found object's distance in pixels from the region's centroid to the true centre."""
    found = components(cell, scene)
    out = []
    for obj in largest_first(scene):
        regions = found[obj["colour"]]
        if not regions:
            out.append((obj["shape"], None))
            continue
        target = np.array(obj["centre"]) * res - 0.5
        dist = [np.hypot(*(np.array(ndimage.center_of_mass(m))[::-1] - target)) for m in regions]
        mask = regions.pop(int(np.argmin(dist)))
        if offsets is not None:
            offsets.append(min(dist))
        out.append((obj["shape"], classify(mask, res)[0]))
    return out


def largest_first(scene):
    """The scene's objects in the order score() takes (and reports) them."""
    return sorted(scene["objects"], key=lambda o: -o["radius"])


def held_out_scenes(shard, count):
    """The first `count` scenes of a shard in key order (a grid's columns), with their keys."""
    with tarfile.open(shard) as tar:
        names = sorted(n for n in tar.getnames() if n.endswith(".json"))[:count]
        return [n[: -len(".json")] for n in names], [json.load(tar.extractfile(n)) for n in names]


def tally(pairs):
    """How many shapes are right and how many objects are missing, as one line."""
    right = sum(t == g for t, g in pairs)
    missing = sum(g is None for _, g in pairs)
    return (f"shape right {right}/{len(pairs)} ({100 * right / len(pairs):.1f} %), "
            f"no region of the colour {missing}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("grid")
    ap.add_argument("shard")
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--detail", action="store_true",
                    help="also: right by objects per scene and by size, how far from their true "
                         "centres the objects were drawn, and the confusion of shapes")
    a = ap.parse_args()
    grid = np.asarray(Image.open(a.grid).convert("RGB")).astype(np.float32)
    rows, cols = grid.shape[0] // a.res, grid.shape[1] // a.res
    _, scenes = held_out_scenes(a.shard, cols)
    for row in range(rows):
        pairs, counts, sizes, offsets = [], [], [], []
        for col, scene in enumerate(scenes):
            cell = grid[row * a.res:(row + 1) * a.res, col * a.res:(col + 1) * a.res]
            pairs += score(cell, scene, a.res, offsets)
            objects = largest_first(scene)
            counts += [len(objects)] * len(objects)
            sizes += [o["size"] for o in objects]
        detail = " ".join(f"{s} {sum(t == g == s for t, g in pairs)}/{sum(t == s for t, _ in pairs)}"
                          for s in SHAPES if any(t == s for t, _ in pairs))
        label = "real" if row == 0 else f"row {row}"
        print(f"{label}: {tally(pairs)} | {detail}")
        if a.detail:
            right = [t == g for t, g in pairs]
            def split(keys, order):
                return " ".join(f"{k} {sum(r for r, kk in zip(right, keys) if kk == k)}/{keys.count(k)}"
                                for k in order if k in keys)
            print(f"  right by objects in the scene: {split(counts, [1, 2, 3])}; "
                  f"by size: {split(sizes, ['small', 'medium', 'large'])}")
            # Where the found objects are: the real row's offsets are the scorer's own (~0).
            off = np.array(offsets)
            print(f"  found objects' centres off the true ones by {np.median(off):.1f} px (median of "
                  f"{len(off)}; within 2 px: {np.mean(off <= 2):.0%}, over 8 px: {np.mean(off > 8):.0%})")
            drawn = SHAPES + [None]
            print("  true shape → drawn as " + " ".join(f"{str(g)[:4]:>5}" for g in drawn))
            for t in SHAPES:
                print(f"  {t:>19} " + " ".join(f"{sum(p == (t, g) for p in pairs):5}" for g in drawn))


if __name__ == "__main__":
    main()
