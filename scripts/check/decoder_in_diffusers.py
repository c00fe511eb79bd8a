"""Loads a `train-decoder` checkpoint of configs/shapes/decoder.yaml into diffusers' UnCLIP decoder
modules (strict: the names match) and asks, at several noise levels, how well the model predicts
the per-image mean (DC) of the noise and of the clean image for the first 8 held-out images.
What found that the ε-model's colour drift came from an ε with no DC (README, Measured).

Usage: .venv/bin/python scripts/check/decoder_in_diffusers.py CHECKPOINT_DIR eps|v GRID.png EMB_DIR
  GRID.png: a grid the run wrote (its top row: the held-out images);
  EMB_DIR: the held-out embedding shard unpacked (KEY.img_emb.npy, KEY.txt_emb.npy, KEY.txt_tokens.npy).
"""
import math, os, sys
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from diffusers import UNet2DConditionModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
ckpt, predict, grid_png, emb_dir = sys.argv[1:5]
w = load_file(os.path.join(ckpt, 'ema.safetensors'))
V = predict == 'v'
unet = UNet2DConditionModel(sample_size=32, in_channels=3, out_channels=6,
    down_block_types=("ResnetDownsampleBlock2D","SimpleCrossAttnDownBlock2D","SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D","SimpleCrossAttnUpBlock2D","ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32,64,128), layers_per_block=1,
    cross_attention_dim=128, attention_head_dim=32, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
    class_embed_type="identity").eval()
proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=128, time_embed_dim=128, cross_attention_dim=128).eval()
print(unet.load_state_dict({k[8:]: v for k, v in w.items() if k.startswith('decoder.')}, strict=True))
print(proj.load_state_dict({k[10:]: v for k, v in w.items() if k.startswith('text_proj.')}, strict=True))
grid = np.asarray(Image.open(grid_png).convert('RGB')).astype(np.float32)/127.5-1
x0 = torch.tensor(grid[:32]).reshape(32, 8, 32, 3).permute(1, 3, 0, 2).contiguous()  # [8,3,32,32]
zi = torch.stack([torch.tensor(np.load(os.path.join(emb_dir, f'{i:09d}.img_emb.npy'))).float() for i in range(8)])
zt = torch.stack([torch.tensor(np.load(os.path.join(emb_dir, f'{i:09d}.txt_emb.npy'))).float() for i in range(8)])
toks = [torch.tensor(np.load(os.path.join(emb_dir, f'{i:09d}.txt_tokens.npy')).astype(np.float32)) for i in range(8)]
L = 24
feats = torch.zeros(8, L, 128); mask = torch.zeros(8, L, dtype=torch.bool)
for i, t in enumerate(toks): feats[i, :len(t)] = t; mask[i, :len(t)] = True
T = 1000
s = torch.arange(T + 1, dtype=torch.float64) / T
f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
betas = (1 - f[1:] / f[:-1]).clamp(max=0.999); acp = torch.cumprod(1 - betas, 0).float()
torch.manual_seed(0)
with torch.no_grad():
    ctx, add = proj(image_embeddings=zi, prompt_embeds=zt, text_encoder_hidden_states=feats, do_classifier_free_guidance=False)
    m = F.pad(mask, (4, 0), value=True)
    print("true bg", x0[:, :, 0, 0].numpy().round(2).tolist())
    for tt in [100, 400, 700, 900, 970, 995]:
        t = torch.full((8,), tt)
        a = acp[tt]
        noise = torch.randn_like(x0)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = unet(xt, t, encoder_hidden_states=ctx, class_labels=add, attention_mask=m).sample
        if V:
            v = out[:, :3]
            eps = (1 - a).sqrt() * xt + a.sqrt() * v
            x0h = (a.sqrt() * xt - (1 - a).sqrt() * v).clamp(-1, 1)
        else:
            eps = out[:, :3]
            x0h = ((xt - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        err_dc = ((x0h - x0).mean(dim=(2, 3))).abs().mean().item()
        print(tt, f"ab={a:.4f}", "eps mse", ((eps - noise) ** 2).mean().item(), "dc err of x0_hat", round(err_dc, 3),
              "eps dc err", ((eps - noise).mean(dim=(2,3))).abs().mean().item(), "noise dc", noise.mean(dim=(2,3)).abs().mean().item())
