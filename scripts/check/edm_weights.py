"""A decoder config whose timestep weights follow EDM's training noise distribution (Karras et al.
2022: log σ ~ N(P_mean, P_std²), loss weight λ(σ) = (σ² + σ_d²) / (σ·σ_d)²), carried over to the
cosine-schedule v-loss of `train-decoder`: per training step t, the x_0-space weight EDM gives
σ(t) = √((1 − ᾱ_t) / ᾱ_t) times |dσ/dt|, times (1 − ᾱ_t) (v-loss → x_0 space), then
floor + (1 − floor)·w / max w, scaled to mean 1, as `diffusion.timestep_loss_weights` in place
of `timestep_emphasis` (docs/decoder-shapes.md).

Usage: .venv/bin/python scripts/check/edm_weights.py configs/shapes/decoder.yaml > /tmp/edm.yaml
           [--p-mean -1.2] [--p-std 1.2] [--sigma-data 0.5] [--floor 0.15]
"""
import argparse, sys
import numpy as np, yaml
import diffusers_decoder

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--p-mean", type=float, default=-1.2)
ap.add_argument("--p-std", type=float, default=1.2)
ap.add_argument("--sigma-data", type=float, default=0.5)
ap.add_argument("--floor", type=float, default=0.15)
a = ap.parse_args()
cfg = yaml.safe_load(open(a.config))
d = cfg["decoder"]["diffusion"]
assert (d.get("predict"), d.get("schedule")) == ("v", "cosine"), "a v-prediction config on the cosine schedule"
acp = diffusers_decoder.alphas_cumprod(d.get("timesteps", 1000)).double().numpy()
sigma = np.sqrt((1 - acp) / acp)
density = np.exp(-0.5 * ((np.log(sigma) - a.p_mean) / a.p_std) ** 2) / (sigma * a.p_std * np.sqrt(2 * np.pi))
lam = (sigma ** 2 + a.sigma_data ** 2) / (sigma * a.sigma_data) ** 2
w = (1 - acp) * density * lam * np.abs(np.gradient(sigma))
w = a.floor + (1 - a.floor) * w / w.max()
d.pop("timestep_emphasis", None)
d["timestep_loss_weights"] = [round(float(x), 4) for x in w / w.mean()]
yaml.safe_dump(cfg, sys.stdout, sort_keys=False, default_flow_style=None, width=100)
