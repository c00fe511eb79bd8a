"""The Python reference for `cargo run --release -p unclip-data --example bench_data`: the same
work in the usual Python stack, on one core.

- read + decode + resize + crop: webdataset → PIL decode → RGB → shorter side resized (bicubic)
  → random square crop → numpy float32 CHW in [-1, 1];
- BSR 1024 → 256: BSRGAN's `degradation_bsrgan_variant` (cv2 resizes and JPEG, scipy.ndimage
  convolutions, numpy noise), as in its repository, without the ISP step.

Usage: data_pipeline.py SHARDS RES [RES ...] --bsr BSR_SHARD --seconds S
Prints one line per measurement: "<name> <samples> <seconds>".
"""
import argparse
import io
import math
import random
import time

import numpy as np
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("shards")
ap.add_argument("res", type=int, nargs="+")
ap.add_argument("--bsr", required=True)
ap.add_argument("--bsr-count", type=int, default=8)
ap.add_argument("--passes", type=int, default=1)
args = ap.parse_args()

import webdataset as wds


def transform(img, res, rng):
    img = img.convert("RGB")
    w, h = img.size
    s = res / min(w, h)
    img = img.resize((max(res, round(w * s)), max(res, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = rng.randint(0, w - res), rng.randint(0, h - res)
    img = img.crop((left, top, left + res, top + res))
    a = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    return a / 127.5 - 1.0


for res in args.res:
    rng = random.Random(0)
    n, t0 = 0, time.perf_counter()
    for _ in range(args.passes):
        ds = wds.WebDataset(args.shards, shardshuffle=False, empty_check=False).decode("pil").to_tuple("png", "txt")
        for img, caption in ds:
            transform(img, res, rng)
            n += 1
    print(f"pipeline{res} {n} {time.perf_counter() - t0:.4f}", flush=True)

# ---- BSRGAN's degradation_bsrgan_variant (cv2 / scipy / numpy), ISP step omitted ----------------
import cv2
import scipy.ndimage
import scipy.stats as ss

cv2.setNumThreads(1)


def fspecial_gaussian(hsize, sigma):
    hsize = [hsize, hsize]
    siz = [(hsize[0] - 1.0) / 2.0, (hsize[1] - 1.0) / 2.0]
    std = sigma
    [x, y] = np.meshgrid(np.arange(-siz[1], siz[1] + 1), np.arange(-siz[0], siz[0] + 1))
    arg = -(x * x + y * y) / (2 * std * std)
    h = np.exp(arg)
    h[h < np.finfo(float).eps * h.max()] = 0
    sumh = h.sum()
    if sumh != 0:
        h = h / sumh
    return h


def anisotropic_gaussian(ksize, theta, l1, l2):
    v = np.dot(np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]), np.array([1.0, 0.0]))
    V = np.array([[v[0], v[1]], [v[1], -v[0]]])
    D = np.array([[l1, 0], [0, l2]])
    Sigma = np.dot(np.dot(V, D), np.linalg.inv(V))
    center = ksize / 2.0 + 0.5
    k = np.zeros([ksize, ksize])
    for y in range(ksize):
        for x in range(ksize):
            cy, cx = y - center + 1, x - center + 1
            k[y, x] = ss.multivariate_normal.pdf([cx, cy], mean=[0, 0], cov=Sigma)
    return k / np.sum(k)


def add_blur(img, sf=4):
    wd2 = 4.0 + sf
    wd = 2.0 + 0.2 * sf
    if random.random() < 0.5:
        l1 = wd2 * random.random()
        l2 = wd2 * random.random()
        k = anisotropic_gaussian(ksize=2 * random.randint(2, 11) + 3, theta=random.random() * np.pi, l1=l1, l2=l2)
    else:
        k = fspecial_gaussian(2 * random.randint(2, 11) + 3, wd * random.random())
    return scipy.ndimage.convolve(img, np.expand_dims(k, axis=2), mode="mirror")


def add_gaussian_noise(img, noise_level1=2, noise_level2=25):
    noise_level = random.randint(noise_level1, noise_level2)
    rnum = np.random.rand()
    if rnum > 0.6:
        img = img + np.random.normal(0, noise_level / 255.0, img.shape).astype(np.float32)
    elif rnum < 0.4:
        img = img + np.random.normal(0, noise_level / 255.0, (*img.shape[:2], 1)).astype(np.float32)
    else:
        L = noise_level2 / 255.0
        D = np.diag(np.random.rand(3))
        U = scipy.linalg.orth(np.random.rand(3, 3))
        conv = np.dot(np.dot(np.transpose(U), D), U)
        img = img + np.random.multivariate_normal([0, 0, 0], np.abs(L ** 2 * conv), img.shape[:2]).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def add_jpeg_noise(img):
    quality_factor = random.randint(30, 95)
    img = cv2.cvtColor((img * 255.0).round().clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    _, encimg = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), quality_factor])
    img = cv2.imdecode(encimg, 1)
    return cv2.cvtColor(img.astype(np.float32) / 255.0, cv2.COLOR_BGR2RGB)


def degradation_bsrgan_variant(image, sf=4):
    image = np.float32(image / 255.0)
    jpeg_prob, scale2_prob = 0.9, 0.25
    h1, w1 = image.shape[:2]
    image = image.copy()[: w1 - w1 % sf, : h1 - h1 % sf, ...]
    h, w = image.shape[:2]
    if sf == 4 and random.random() < scale2_prob:
        image = cv2.resize(image, (int(1 / 2 * w), int(1 / 2 * h)), interpolation=random.choice([1, 2, 3]))
        image = np.clip(image, 0.0, 1.0)
        sf = 2
    shuffle_order = random.sample(range(6), 6)
    idx1, idx2 = shuffle_order.index(2), shuffle_order.index(3)
    if idx1 > idx2:
        shuffle_order[idx1], shuffle_order[idx2] = shuffle_order[idx2], shuffle_order[idx1]
    for i in shuffle_order:
        if i in (0, 1):
            image = add_blur(image, sf=sf)
        elif i == 2:
            a, b = image.shape[1], image.shape[0]
            if random.random() < 0.75:
                sf1 = random.uniform(1, 2 * sf)
                image = cv2.resize(image, (int(1 / sf1 * image.shape[1]), int(1 / sf1 * image.shape[0])),
                                   interpolation=random.choice([1, 2, 3]))
            else:
                k = fspecial_gaussian(25, random.uniform(0.1, 0.6 * sf))
                k = k / k.sum()
                image = scipy.ndimage.convolve(image, np.expand_dims(k, axis=2), mode="mirror")
                image = image[0::sf, 0::sf, ...]
            image = np.clip(image, 0.0, 1.0)
        elif i == 3:
            image = cv2.resize(image, (int(1 / sf * a), int(1 / sf * b)), interpolation=random.choice([1, 2, 3]))
            image = np.clip(image, 0.0, 1.0)
        elif i == 4:
            image = add_gaussian_noise(image)
        elif i == 5:
            if random.random() < jpeg_prob:
                image = add_jpeg_noise(image)
    return add_jpeg_noise(image)


import scipy.linalg  # noqa: E402

random.seed(0)
np.random.seed(0)
images = [np.asarray(img.convert("RGB")) for (img,) in
          wds.WebDataset(args.bsr, shardshuffle=False, empty_check=False).decode("pil").to_tuple("png")][: args.bsr_count]
t0 = time.perf_counter()
for img in images:
    out = degradation_bsrgan_variant(img, sf=4)
    assert out.shape[:2] == (img.shape[0] // 4, img.shape[1] // 4), out.shape
print(f"bsr {len(images)} {time.perf_counter() - t0:.4f}", flush=True)
