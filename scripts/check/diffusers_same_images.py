"""Runs diffusers' own UnCLIPPipeline on a pipeline directory and compares its images with the PNGs
`sample --diffusers DIR --noise diffusers` wrote for the same captions and seed (on the CPU in
fp32): the check that the framework samples a pipeline directory as diffusers does, on trained
weights (tests/diffusers_pipeline.rs does it on random ones).

Usage: .venv/bin/python scripts/check/diffusers_same_images.py DIR OUR_DIR --seed S [--prior-guidance G]
           [--decoder-guidance G] [--wrap-normalised] CAPTION...
  OUR_DIR: what `sample --diffusers DIR --clip CLIP --noise diffusers --count 1 --seed S
  --precision fp32 --device cpu --out OUR_DIR --caption …` wrote (000_00.png, 001_00.png, …).
  --wrap-normalised: the pipeline's runs took L2-normalised embeddings (the default
  clip_embeddings), so the text encoder is wrapped to normalise z_t as the README shows.

Prints, for diffusers' schedulers as shipped (tables in float32) and with their tables in float64
(as the framework keeps them), the largest difference in 8-bit levels and the share of values
within one level.
"""
import argparse
import os
import sys

import numpy as np
import torch
from diffusers import UnCLIPPipeline
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unclip_pipe import float64_tables, normalise_text_embeds  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("dir")
parser.add_argument("ours")
parser.add_argument("captions", nargs="+")
parser.add_argument("--seed", type=int, required=True)
parser.add_argument("--prior-guidance", type=float, default=4.0)
parser.add_argument("--decoder-guidance", type=float, default=8.0)
parser.add_argument("--wrap-normalised", action="store_true")
args = parser.parse_args()

pipe = UnCLIPPipeline.from_pretrained(args.dir, torch_dtype=torch.float32)
if args.wrap_normalised:
    normalise_text_embeds(pipe)
ours = np.stack([np.asarray(Image.open(f"{args.ours}/{i:03d}_00.png").convert("RGB"), dtype=np.float64)
                 for i in range(len(args.captions))])


for tables in ("float32 (as shipped)", "float64"):
    if tables == "float64":
        float64_tables(pipe)
    with torch.no_grad():
        images = pipe(args.captions, generator=torch.Generator().manual_seed(args.seed),
                      prior_guidance_scale=args.prior_guidance, decoder_guidance_scale=args.decoder_guidance,
                      output_type="np").images
    # As `sample` writes PNGs: round(255 x) of the clamped image.
    theirs = np.round(np.clip(images, 0, 1) * 255.0)
    diff = np.abs(theirs - ours)
    print(f"diffusers' schedule tables in {tables}: {len(args.captions)} images of {ours.shape[1]} px, "
          f"largest difference {diff.max():.0f} levels, {100 * (diff <= 1).mean():.2f} % of values within "
          f"one level, mean {diff.mean():.3f} levels")
