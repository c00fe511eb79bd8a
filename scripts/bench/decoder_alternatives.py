"""Two ways around the decoder step's kernels on CPU, measured and not taken (the README's decoder
figures). Measurement only; fp32, 2 threads, the shapes decoder's batch 32.

  decoder_alternatives.py subpixel [cuda] nearest-2x upsample + 3x3 conv against four 2x2 sub-pixel
                                         convolutions of the low-resolution input (exact; checked
                                         in float64 first), forward and forward + backward, at
                                         the shapes decoder's two upsampling convolutions — or,
                                         with `cuda`, at the bench's paper-like widths (192, 384,
                                         576, 768 at 64 px, batch 64) under bf16 autocast, to
                                         decide whether CUDA should take the sub-pixel path too
  decoder_alternatives.py channels-last  diffusers' training step (scripts/bench/decoder_step.py)
                                         against the same model channels-last with a GroupNorm
                                         composed of layout-keeping reductions and one multiply-add,
                                         alternating two steps of each; median of the time ratios

Both alternate the variants in one process, so that the machine's drifts in speed hit both.
"""
import copy
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def paired(a, b, rounds=12, warmup=3):
    """Median seconds of a and b and the median of the rounds' ratios a / b."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for i in range(rounds):
        for f, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            sync()
            start = time.perf_counter()
            f()
            sync()
            out.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def phase_kernels(w):
    """The 2x2 kernels of the four output phases (a, b): phase 0 reads rows (i-1, i) with taps
    (w[0], w[1] + w[2]), phase 1 rows (i, i+1) with (w[0] + w[1], w[2]); likewise for columns."""
    def taps(k, dim):
        t = [k.narrow(dim, i, 1) for i in range(3)]
        return torch.cat([t[0], t[1] + t[2]], dim), torch.cat([t[0] + t[1], t[2]], dim)

    return [kernel for rows in taps(w, 2) for kernel in taps(rows, 3)]


def subpixel_conv(x, w, b):
    """conv3x3(upsample_nearest_2x(x)) as unclip_diffusion::nn::upsample_conv3x3 computes it."""
    n, _, h, wd = x.shape
    kernels = phase_kernels(w)
    phases = [F.conv2d(F.pad(x, (1 - c, c, 1 - a, a)), kernels[2 * a + c], b) for a in range(2) for c in range(2)]
    rows = [torch.stack(phases[2 * a:2 * a + 2], -1) for a in range(2)]
    return torch.stack(rows, 3).reshape(n, w.shape[0], 2 * h, 2 * wd)


def upsample_conv(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)


def subpixel(device="cpu"):
    cuda = device == "cuda"
    batch, shapes = (64, [(768, 8), (576, 16), (384, 32)]) if cuda else (32, [(64, 16), (128, 8)])
    for channels, res in shapes:
        x, w, b = (torch.randn(2, channels, res, res, dtype=torch.float64, device=device),
                   torch.randn(channels, channels, 3, 3, dtype=torch.float64, device=device),
                   torch.randn(channels, dtype=torch.float64, device=device))
        diff = (subpixel_conv(x, w, b) - upsample_conv(x, w, b)).abs().max().item()
        assert diff < 1e-9 * channels, diff
        x = torch.randn(batch, channels, res, res, device=device, requires_grad=True)
        w, b = (t.float().requires_grad_() for t in (w, b))
        g = torch.randn(batch, channels, 2 * res, 2 * res, device=device)

        def run(conv, backward):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
                y = conv(x, w, b)
            if backward:
                y.float().backward(g)

        fwd = paired(lambda: run(upsample_conv, False), lambda: run(subpixel_conv, False))
        both = paired(lambda: run(upsample_conv, True), lambda: run(subpixel_conv, True))
        print(f"{channels} channels, {res} -> {2 * res} px, batch {batch}, {device}{', bf16' if cuda else ''} "
              f"(float64 max difference {diff:.1e}): forward {1e3 * fwd[0]:.2f} ms upsample + conv, "
              f"{1e3 * fwd[1]:.2f} sub-pixel ({fwd[2]:.2f}x); forward + backward {1e3 * both[0]:.2f} / "
              f"{1e3 * both[1]:.2f} ms ({both[2]:.2f}x)")


class ComposedGroupNorm(nn.Module):
    """GroupNorm from per-channel means of x and x² (reductions that keep x's layout)."""

    def __init__(self, gn):
        super().__init__()
        self.groups, self.eps, self.weight, self.bias = gn.num_groups, gn.eps, gn.weight, gn.bias

    def forward(self, x):
        n, c = x.shape[:2]
        dims = tuple(range(2, x.dim()))
        xf = x.float()
        mean_c, sq_c = xf.mean(dim=dims), (xf * xf).mean(dim=dims)
        mean = mean_c.view(n, self.groups, -1).mean(-1, keepdim=True)
        var = sq_c.view(n, self.groups, -1).mean(-1, keepdim=True) - mean * mean
        rstd = (var + self.eps).rsqrt()
        scale = rstd.expand(n, self.groups, c // self.groups).reshape(n, c) * self.weight
        shift = self.bias - mean.expand(n, self.groups, c // self.groups).reshape(n, c) * scale
        index = (slice(None), slice(None)) + (None,) * len(dims)
        return x * scale[index] + shift[index]


def channels_last():
    sys.argv = ["decoder_step.py", "32,64,128", "1", "32", "128", "24", "32", "32", "2", "cpu"]
    source = open("scripts/bench/decoder_step.py").read().rsplit("def timed(n):", 1)[0]
    scope = {"__name__": "decoder_step"}
    exec(source, scope)

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, ComposedGroupNorm(child))
            else:
                swap(child)

    nchw = scope["unet"]
    last = copy.deepcopy(nchw)
    swap(last)
    last = last.to(memory_format=torch.channels_last)

    def two_steps(model):
        scope["unet"] = model  # step() reads the global
        scope["step"]()
        scope["step"]()

    a, b, ratio = paired(lambda: two_steps(nchw), lambda: two_steps(last))
    print(f"diffusers' step: {a / 2:.3f} s as it is, {b / 2:.3f} s channels-last with the composed "
          f"GroupNorm; channels-last runs {ratio:.2f}x as fast")


if __name__ == "__main__":
    {"subpixel": subpixel, "channels-last": channels_last}[sys.argv[1]](*sys.argv[2:])
