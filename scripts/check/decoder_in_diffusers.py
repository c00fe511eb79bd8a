"""Loads a `train-decoder` checkpoint (the UNet from its run's config.yaml) into diffusers' UnCLIP decoder
modules (strict: the names match) and asks, at several noise levels, how well the model predicts
the per-image mean (DC) of the noise and of the clean image for the first 8 held-out images.
What found that the ε-model's colour drift came from an ε with no DC (docs/decoder-shapes.md).

Usage: .venv/bin/python scripts/check/decoder_in_diffusers.py CHECKPOINT_DIR eps|v GRID.png EMB_DIR
  GRID.png: a grid the run wrote (its top row: the held-out images);
  EMB_DIR: the held-out embedding shard unpacked (KEY.img_emb.npy, KEY.txt_emb.npy, KEY.txt_tokens.npy).
"""
import os, sys
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_decoder
ckpt, predict, grid_png, emb_dir = sys.argv[1:5]
V = predict == 'v'
cfg, unet, proj = diffusers_decoder.ema_modules(ckpt)
res = cfg["data"]["image"]["resolution"]
grid = np.asarray(Image.open(grid_png).convert('RGB')).astype(np.float32)/127.5-1
x0 = torch.tensor(grid[:res, :8 * res]).reshape(res, 8, res, 3).permute(1, 3, 0, 2).contiguous()  # [8,3,res,res]
zi = torch.stack([torch.tensor(np.load(os.path.join(emb_dir, f'{i:09d}.img_emb.npy'))).float() for i in range(8)])
zt = torch.stack([torch.tensor(np.load(os.path.join(emb_dir, f'{i:09d}.txt_emb.npy'))).float() for i in range(8)])
toks = [torch.tensor(np.load(os.path.join(emb_dir, f'{i:09d}.txt_tokens.npy')).astype(np.float32)) for i in range(8)]
feats, mask = diffusers_decoder.padded_tokens(toks)
acp = diffusers_decoder.alphas_cumprod()
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
