"""diffusers' UnCLIP decoder modules (`UNet2DConditionModel` + `UnCLIPTextProjModel`, as the UnCLIP
pipeline configures them) built from a `train-decoder` config, our checkpoints' EMA weights loaded
into them (strict: the names match), and the core's cosine schedule. Shared by the check scripts
that run or train our decoder in PyTorch.
"""
import io, os, tarfile
import numpy as np, torch, yaml
from safetensors.torch import load_file
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel


def run_config(ckpt):
    """The resolved config of the run a checkpoint directory (RUN/checkpoints/step-N) belongs to."""
    return yaml.safe_load(open(os.path.join(ckpt, "..", "..", "config.yaml")))


def modules(cfg):
    """(unet, text_proj) for the config's `decoder.model` at its `data.image.resolution`."""
    m = cfg["decoder"]["model"]
    u = m["unet"]
    # 6 input channels: a self-conditioned decoder (x_t, then its x0 estimate)
    unet = UNet2DConditionModel(sample_size=cfg["data"]["image"]["resolution"],
        in_channels=u.get("in_channels", 3), out_channels=6, down_block_types=tuple(u["down_block_types"]),
        up_block_types=tuple(u["up_block_types"]), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=tuple(u["block_out_channels"]), layers_per_block=u["layers_per_block"],
        cross_attention_dim=u["cross_attention_dim"], attention_head_dim=u["attention_head_dim"],
        norm_num_groups=u["norm_num_groups"], resnet_time_scale_shift="scale_shift",
        class_embed_type="identity", only_cross_attention=only_cross(u.get("only_cross_attention", False)),
        mid_block_only_cross_attention=u.get("mid_block_only_cross_attention"))
    for layer in unet.modules():
        if isinstance(layer, Attention) and layer.only_cross_attention:
            layer.set_processor(OnlyCrossAttnProcessor())
    proj = UnCLIPTextProjModel(clip_extra_context_tokens=m["clip_extra_context_tokens"],
        clip_embeddings_dim=m["clip_embeddings_dim"], time_embed_dim=4 * u["block_out_channels"][0],
        cross_attention_dim=u["cross_attention_dim"])
    return unet, proj


class OnlyCrossAttnProcessor(AttnAddedKVProcessor2_0):
    """AttnAddedKVProcessor2_0 for `only_cross_attention` layers: diffusers pads the context mask
    by the image tokens even when, as here, the keys are the context's alone (a shape error)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if attention_mask is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, None)
        pad = attn.prepare_attention_mask
        attn.prepare_attention_mask = lambda m, length, batch, out_dim=3: pad(m, 0, batch, out_dim)
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
        finally:
            del attn.prepare_attention_mask


def only_cross(v):
    """diffusers takes a bool or a tuple (one per down block); YAML gives a bool or a list."""
    return tuple(v) if isinstance(v, list) else v


def load_ema(ckpt, unet, proj):
    """A checkpoint's EMA weights (`decoder.*`, `text_proj.*`) into the two modules."""
    w = load_file(os.path.join(ckpt, "ema.safetensors"))
    unet.load_state_dict({k[8:]: v for k, v in w.items() if k.startswith("decoder.")}, strict=True)
    proj.load_state_dict({k[10:]: v for k, v in w.items() if k.startswith("text_proj.")}, strict=True)


def ema_modules(ckpt):
    """(config, unet, text_proj) of a checkpoint directory, its EMA weights loaded, in eval mode."""
    cfg = run_config(ckpt)
    unet, proj = modules(cfg)
    load_ema(ckpt, unet, proj)
    return cfg, unet.eval(), proj.eval()


def stored_embeddings(emb_tar, keys):
    """z_i [N, D], z_t [N, D] and the caption token features (a list of [L_i, D]) of the samples
    `keys`, from an `embed --token-features` shard."""
    with tarfile.open(emb_tar) as tar:
        def arrays(suffix):
            return [torch.tensor(np.load(io.BytesIO(tar.extractfile(k + suffix).read())).astype(np.float32))
                    for k in keys]
        return torch.stack(arrays(".img_emb.npy")), torch.stack(arrays(".txt_emb.npy")), arrays(".txt_tokens.npy")


def condition(cfg, proj, z_i, z_t, feats, mask):
    """(context, additive time embedding, attention mask) for the UNet: the text projection of z_i
    and the caption (z_t, padded token features and their mask), the CLIP tokens always attended."""
    with torch.no_grad():
        ctx, add = proj(image_embeddings=z_i, prompt_embeds=z_t, text_encoder_hidden_states=feats,
                        do_classifier_free_guidance=False)
    pad = torch.ones(len(z_i), cfg["decoder"]["model"]["clip_extra_context_tokens"], dtype=torch.bool)
    return ctx, add, torch.cat([pad, mask], 1)


def alphas_cumprod(timesteps=1000):
    """ᾱ_t of the core's cosine schedule (betas capped at 0.999): diffusers' squaredcos_cap_v2."""
    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2").alphas_cumprod


def padded_tokens(toks, length=None):
    """Caption token features of different lengths ([L_i, D] each) as one [N, length, D] tensor
    (zeros past each caption) and its [N, length] mask; length defaults to the longest."""
    length = length or max(len(t) for t in toks)
    feats = torch.zeros(len(toks), length, toks[0].shape[1])
    mask = torch.zeros(len(toks), length, dtype=torch.bool)
    for i, t in enumerate(toks):
        feats[i, : len(t)], mask[i, : len(t)] = torch.as_tensor(t), True
    return feats, mask


def network_input(cfg, *parts):
    """The UNet's input: `parts` ([B, C, H, W]: x_t, then a self-conditioned decoder's x0 estimate)
    on the channel axis, then, when the config sets the prototype `decoder.model.coord_channels`,
    CoordConv's x and y channels (Liu et al. 2018; in [-1, 1] at pixel centres)."""
    if cfg["decoder"]["model"].get("coord_channels"):
        b, _, h, w = parts[0].shape
        y, x = torch.meshgrid(*[(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in (h, w)],
                              indexing="ij")
        parts = parts + (torch.stack([x, y])[None].expand(b, 2, h, w).to(parts[0].dtype),)
    return torch.cat(parts, 1)

