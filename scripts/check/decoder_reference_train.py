"""The shapes decoder's training recipe in PyTorch with diffusers' modules, as a reference for
`train-decoder`'s training dynamics: same config file, shards, stored CLIP embeddings, loss (v or ε
MSE + the learned-range VLB at λ = 0.001·T, timestep emphasis), guidance dropout (learned null
z_i, the empty caption), AdamW with warm-up and global-norm clipping, EMA with warm-up, bf16
autocast when the config says so, self-conditioning when `decoder.model.self_condition` is set.
Three prototypes the Rust trainer does not have (docs/decoder-shapes.md: *With the answer given*):
`decoder.model.coord_channels: true` (with `unet.in_channels` 2 more) appends x / y coordinate
channels to the UNet's input (CoordConv); `--repa CLIP_RUN` adds REPA (Yu et al. 2024): a
3-layer 1×1-conv projector of the `--repa-layer` output (mid block) is pulled, by cosine
similarity with weight `--repa-weight` (0.5), towards the frozen CLIP ResNet's `--repa-target`
(layer2) features of the clean 64-px image; `--immiscible` pairs each batch's images with its noise
draws by a minimum-L2 assignment (immiscible diffusion, Li et al. 2024); `--edge-weight W` weights the
MSE of pixels on an object's outline (3x3 colour range of x0 above 0.25) by 1 + W.
Writes the EMA weights under our checkpoint names (RUN/checkpoints/step-N/ema.safetensors,
RUN/config.yaml), so shape_denoise.py scores it like one of ours (docs/decoder-shapes.md).

Usage: .venv/bin/python scripts/check/decoder_reference_train.py CONFIG.yaml RUN_DIR NULL_EMB.tar \
           [--steps N] [--threads 2]
  NULL_EMB.tar: `embed --token-features` of a one-sample shard whose caption is empty (the
  empty caption's z_t and token features; the decoder's text dropout uses them). docs/decoder-shapes.md's
  "Training dynamics against diffusers" shows how to make one.
"""
import argparse, io, math, os, re, sys, tarfile, time

import numpy as np, torch, yaml
from PIL import Image
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_decoder

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("run_dir")
ap.add_argument("null_emb")
ap.add_argument("--steps", type=int)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repa", metavar="CLIP_RUN", help="REPA: align the UNet's mid-block features with the "
                "frozen CLIP image tower's layer-2 features of the clean image (Yu et al. 2024)")
ap.add_argument("--repa-weight", type=float, default=0.5)
ap.add_argument("--repa-layer", default="mid_block", help="UNet module whose output is aligned")
ap.add_argument("--repa-target", default="layer2", help="CLIP ResNet stage: layer1..layer4")
ap.add_argument("--edge-weight", type=float, default=0.0, help="weight the MSE of pixels on an object's "
                "outline (3x3 colour range of x0 > 0.25) 1 + this, each image's weights normalised to mean 1")
ap.add_argument("--immiscible", action="store_true", help="Immiscible diffusion (Li et al. 2024): pair each batch's "
                "images with its noise draws by a minimum-L2 assignment instead of at random")
a = ap.parse_args()
torch.set_num_threads(a.threads)
cfg = yaml.safe_load(open(a.config))
dec, data, tr = cfg["decoder"], cfg["data"], cfg["train"]
m, d = dec["model"], dec["diffusion"]
assert d.get("schedule") == "cosine" and d.get("timesteps") == 1000 and d.get("variance") == "learned_range"
# What this reference does not reproduce is refused rather than silently trained differently.
unsupported = [k for k in ("timestep_loss_weights", "min_snr_gamma") if d.get(k) is not None] + \
    [f"train.{k}" for k in ("lr_schedule", "sam_rho", "grad_accum") if tr.get(k) not in (None, "constant", 1)]
assert not unsupported, f"not reproduced here: {unsupported}"
res, steps, batch = data["image"]["resolution"], a.steps or tr["steps"], tr["batch_size"]
torch.manual_seed(cfg.get("seed", 0))


def expand(pattern):
    """data/x-{000000..000019}.tar → the 20 paths."""
    g = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not g:
        return [pattern]
    lo, hi = g.group(1), g.group(2)
    return [pattern[: g.start()] + str(i).zfill(len(lo)) + pattern[g.end():] for i in range(int(lo), int(hi) + 1)]


def load_npy(tar, name):
    return np.load(io.BytesIO(tar.extractfile(name).read())).astype(np.float32)


images, images_full, zi, zt, toks, missing = [], [], [], [], [], 0
for shard in expand(data["train"]):
    emb = os.path.join(data["embedding_dir"], os.path.basename(shard))
    with tarfile.open(shard) as ti, tarfile.open(emb) as te:
        names = set(te.getnames())
        for n in sorted(x for x in ti.getnames() if x.endswith(".png")):
            k = n[:-4]
            if k + ".txt_tokens.npy" not in names:
                missing += 1
                continue
            full = Image.open(io.BytesIO(ti.extractfile(n).read())).convert("RGB")
            images.append(np.asarray(full.resize((res, res), Image.BICUBIC)))
            if a.repa:
                images_full.append(np.asarray(full))
            zi.append(load_npy(te, k + ".img_emb.npy"))
            zt.append(load_npy(te, k + ".txt_emb.npy"))
            toks.append(load_npy(te, k + ".txt_tokens.npy"))
with tarfile.open(a.null_emb) as te:
    k = [n for n in te.getnames() if n.endswith(".txt_tokens.npy")][0][: -len(".txt_tokens.npy")]
    null_zt, null_tok = load_npy(te, k + ".txt_emb.npy"), load_npy(te, k + ".txt_tokens.npy")
L = max(len(t) for t in toks + [null_tok])
X = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
ZI, ZT = torch.tensor(np.stack(zi)), torch.tensor(np.stack(zt))
F, M = diffusers_decoder.padded_tokens(toks, L)
NF, NM = diffusers_decoder.padded_tokens([null_tok], L)
NZT = torch.tensor(null_zt)[None]
N = len(X)
print(f"{N} training images at {res} px ({missing} without embeddings, left out), "
      f"{L} caption tokens at most", flush=True)

unet, proj = diffusers_decoder.modules(cfg)
unet, proj = unet.train(), proj.train()
named = [("decoder." + k, p) for k, p in unet.named_parameters()] + \
        [("text_proj." + k, p) for k, p in proj.named_parameters()]
params = [p for _, p in named]
if a.repa:
    # The frozen CLIP's features of every clean training image, computed once.
    import clip_tower
    tower, stages = clip_tower.load(a.repa), clip_tower.STAGES.index(a.repa_target) + 1
    XF = np.stack(images_full)
    del images_full
    TGT = torch.cat([clip_tower.stage_features(tower, XF[i:i + 256], stages)[-1].to(torch.bfloat16)
                     for i in range(0, len(XF), 256)])
    del XF
    feats_out = {}
    layer = unet.get_submodule(a.repa_layer)
    layer.register_forward_hook(lambda mod, inp, out: feats_out.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        probe = torch.zeros(1, unet.config.in_channels, res, res)
        # the hooked module's width, from one forward of a blank input
        ctx0, add0 = proj(image_embeddings=torch.zeros(1, m["clip_embeddings_dim"]), prompt_embeds=torch.zeros(1, m["clip_embeddings_dim"]),
                          text_encoder_hidden_states=torch.zeros(1, 1, m["clip_embeddings_dim"]), do_classifier_free_guidance=False)
        unet(probe, torch.zeros(1, dtype=torch.long), encoder_hidden_states=ctx0, class_labels=add0)
    cin, cout, hid = feats_out["h"].shape[1], TGT.shape[1], 512
    projector = torch.nn.Sequential(torch.nn.Conv2d(cin, hid, 1), torch.nn.SiLU(), torch.nn.Conv2d(hid, hid, 1),
                                    torch.nn.SiLU(), torch.nn.Conv2d(hid, cout, 1))
    params = params + list(projector.parameters())
    print(f"REPA: {a.repa_layer} ({cin} channels, {tuple(feats_out['h'].shape[2:])}) -> CLIP {a.repa_target} "
          f"{tuple(TGT.shape[1:])}, weight {a.repa_weight}", flush=True)
print(f"{sum(p.numel() for p in params) / 1e6:.2f} M parameters", flush=True)
lr = tr["lr"]
opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, tr.get("beta2", 0.999)), eps=tr.get("eps", 1e-8),
                        weight_decay=tr.get("weight_decay", 0.0))
ema = {k: p.detach().clone() for k, p in named}

T = 1000
acp = diffusers_decoder.alphas_cumprod(T).double()
acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
betas = 1 - acp / acp_prev
post_var = betas * (1 - acp_prev) / (1 - acp)
tab = {k: v.float() for k, v in dict(sa=acp.sqrt(), s1a=(1 - acp).sqrt(),
    c1=betas * acp_prev.sqrt() / (1 - acp), c2=(1 - acp_prev) * (1 - betas).sqrt() / (1 - acp),
    plv=torch.log(torch.cat([post_var[1:2], post_var[1:]])), lb=betas.log()).items()}
weights = torch.ones(T)
if "timestep_emphasis" in d:
    e = d["timestep_emphasis"]
    s = torch.arange(T, dtype=torch.float64) / T
    w = e["floor"] + (1 - e["floor"]) * torch.exp(-0.5 * ((s - e["centre"]) / e["width"]) ** 2)
    weights = (w / w.mean()).float()


def g(name, t):
    return tab[name][t].view(-1, 1, 1, 1)


def cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_nll(x, mean, log_scale):
    c, inv = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv * (c + 1 / 255)), cdf(inv * (c - 1 / 255))
    lp = torch.where(x < -0.999, cdf_plus.clamp(min=1e-12).log(),
         torch.where(x > 0.999, (1 - cdf_min).clamp(min=1e-12).log(), (cdf_plus - cdf_min).clamp(min=1e-12).log()))
    return -lp


def x0_from(mean_out, x_t, t):
    """x0 from the model's mean channels (v or ε)."""
    if d.get("predict", "epsilon") == "v":
        return g("sa", t) * x_t - g("s1a", t) * mean_out
    return (x_t - g("s1a", t) * mean_out) / g("sa", t)


def loss_fn(x0, zi, zt, feats, mask, tgt=None):
    b = len(x0)
    t = torch.randint(0, T, (b,))
    noise = torch.randn_like(x0)
    if a.immiscible:
        cost = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float())
        noise = noise[torch.as_tensor(linear_sum_assignment(cost.numpy())[1])]
    x_t = g("sa", t) * x0 + g("s1a", t) * noise
    drop_i = torch.rand(b) < dec.get("image_drop_prob", 0.1)
    drop_t = torch.rand(b) < dec.get("text_drop_prob", 0.5)
    zi = torch.where(drop_i[:, None], proj.learned_classifier_free_guidance_embeddings[None], zi)
    zt = torch.where(drop_t[:, None], NZT, zt)
    feats = torch.where(drop_t[:, None, None], NF, feats)
    mask = torch.where(drop_t[:, None], NM, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tr.get("precision") == "bf16"):
        ctx, add = proj(image_embeddings=zi, prompt_embeds=zt, text_encoder_hidden_states=feats,
                        do_classifier_free_guidance=False)
        attn = torch.cat([torch.ones(b, m["clip_extra_context_tokens"], dtype=torch.bool), mask], 1)
        net_in = diffusers_decoder.network_input(cfg, x_t)
        if m.get("self_condition"):
            # Self-conditioning (Chen et al. 2022): half the time the input carries the model's own
            # x0 estimate from a first, gradient-free pass; otherwise zeros.
            x0_sc = torch.zeros_like(x0)
            if torch.rand(()) < 0.5:
                with torch.no_grad():
                    first = unet(diffusers_decoder.network_input(cfg, x_t, x0_sc), t, encoder_hidden_states=ctx, class_labels=add,
                                 attention_mask=attn).sample.float()[:, :3]
                x0_sc = x0_from(first, x_t, t).clamp(-1, 1)
            net_in = diffusers_decoder.network_input(cfg, x_t, x0_sc)
        out = unet(net_in, t, encoder_hidden_states=ctx, class_labels=add, attention_mask=attn).sample
    out = out.float()
    mean_out, var_out = out[:, :3], out[:, 3:]
    target = g("sa", t) * noise - g("s1a", t) * x0 if d.get("predict", "epsilon") == "v" else noise
    pred_x0 = x0_from(mean_out.detach(), x_t, t)
    err = (mean_out - target).square()
    if a.edge_weight:
        pool = torch.nn.functional.max_pool2d
        edge = ((pool(x0, 3, 1, 1) + pool(-x0, 3, 1, 1)).amax(1, keepdim=True) > 0.25).float()
        w = 1 + a.edge_weight * edge
        err = err * (w / w.mean(dim=(2, 3), keepdim=True))
    mse = err.mean(dim=(1, 2, 3))
    frac = (var_out + 1) / 2
    model_logvar = frac * g("lb", t) + (1 - frac) * g("plv", t)
    model_mean = g("c1", t) * pred_x0 + g("c2", t) * x_t
    true_mean, true_logvar = g("c1", t) * x0 + g("c2", t) * x_t, g("plv", t)
    kl = 0.5 * (-1 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2)
    nll = discretized_nll(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3)) / math.log(2)
    vb = torch.where(t == 0, nll, kl)
    total = ((mse + d.get("vlb_weight", 0.001) * T * vb) * weights[t]).mean()
    running.append(total.item())  # logged without the REPA term
    if tgt is not None:
        h = projector(feats_out["h"].float())
        if h.shape[2:] != tgt.shape[2:]:
            h = torch.nn.functional.adaptive_avg_pool2d(h, tgt.shape[2:])
        cos = torch.nn.functional.cosine_similarity(h, tgt.float(), dim=1)
        repa_running.append(cos.mean().item())
        total = total - a.repa_weight * cos.mean()
    return total


def save(step):
    out = os.path.join(a.run_dir, "checkpoints", f"step-{step:09d}")
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(out, "ema.safetensors"))
    print(f"checkpoint {out}", flush=True)


os.makedirs(a.run_dir, exist_ok=True)
yaml.safe_dump(cfg, open(os.path.join(a.run_dir, "config.yaml"), "w"), sort_keys=False)
order, pos, start, running, repa_running = torch.randperm(N), 0, time.time(), [], []
every = cfg.get("checkpoint", {}).get("every", steps)
for step in range(1, steps + 1):
    if pos + batch > N:
        order, pos = torch.randperm(N), 0
    idx = order[pos: pos + batch]
    pos += batch
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, step / max(tr.get("warmup_steps", 0), 1))
    loss = loss_fn(X[idx], ZI[idx], ZT[idx], F[idx], M[idx], TGT[idx] if a.repa else None)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, tr.get("grad_clip", 1.0))
    opt.step()
    decay = min(tr.get("ema_decay", 0.9999), (1 + step - 1) / (10 + step - 1))
    with torch.no_grad():
        for k, p in named:
            ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)
    if step % 50 == 0:
        extra = f" repa cos {np.mean(repa_running):.3f}" if repa_running else ""
        print(f"step {step}/{steps} loss {np.mean(running):.4f}{extra} {step * batch / (time.time() - start):.1f} samples/s",
              flush=True)
        running, repa_running = [], []
    if step % every == 0 or step == steps:
        save(step)
print(f"{time.time() - start:.1f} s")
