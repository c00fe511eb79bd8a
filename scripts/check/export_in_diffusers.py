"""Loads a directory `export` wrote with diffusers' UnCLIPPipeline and checks it against the
framework's own outputs: the tokenizer and text encoder against the z_t and token features `embed`
stored for the same captions; the prior, decoder (with text_proj) and upsampler against the
outputs `cargo run --release -p unclip-cli --example export_reference` computed on the same inputs
(REFERENCE); then samples the whole pipeline for two captions.

Usage: .venv/bin/python scripts/check/export_in_diffusers.py EXPORT_DIR EMBEDDING_SHARD REFERENCE OUT.png [--raw]
  EMBEDDING_SHARD: an `embed --token-features` shard made with the same CLIP
  (e.g. data/shapes/emb64/clipval64-000000.tar);
  REFERENCE: what export_reference wrote for the runs that were exported.
  --raw: the runs were trained with clip_embeddings: raw (on `embed --raw` shards).

The framework's z_t is L2-normalised by default; diffusers' pipeline uses
CLIPTextModelWithProjection's text_embeds as they come, so the text encoder is wrapped to normalise
them (as the README shows). Runs trained on raw embeddings take them as they come: with --raw the
pipeline runs unwrapped, as diffusers ships it.
"""
import io, os, sys, tarfile
import numpy as np, torch, torch.nn.functional as F
from diffusers import UnCLIPPipeline
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unclip_pipe import normalise_text_embeds

raw = "--raw" in sys.argv[1:]
export_dir, shard, reference, out_png = [a for a in sys.argv[1:] if a != "--raw"][:4]
pipe = UnCLIPPipeline.from_pretrained(export_dir, torch_dtype=torch.float32)
for name in ["prior", "decoder", "text_proj", "super_res_first", "super_res_last", "text_encoder",
             "tokenizer", "prior_scheduler", "decoder_scheduler", "super_res_scheduler"]:
    print(f"{name}: {type(getattr(pipe, name)).__name__}")

if not raw:
    normalise_text_embeds(pipe)

# The stored embeddings of the shard's first 64 captions.
samples = {}
with tarfile.open(shard) as tar:
    for m in tar.getmembers():
        key, ext = m.name.split(".", 1)
        samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
keys = sorted(samples)[:64]
captions = [samples[k]["txt"].decode() for k in keys]
load = lambda b: np.load(io.BytesIO(b)).astype(np.float32)
z_t = torch.tensor(np.stack([load(samples[k]["txt_emb.npy"]) for k in keys]))
tokens = [torch.tensor(load(samples[k]["txt_tokens.npy"])) for k in keys]

ctx = pipe.tokenizer.model_max_length
ids = pipe.tokenizer(captions, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
with torch.no_grad():
    out = pipe.text_encoder(ids.input_ids)
cos = (F.normalize(out.text_embeds, dim=-1) * F.normalize(z_t, dim=-1)).sum(-1)
print(f"z_t: cos(diffusers' text encoder, embed's) over {len(keys)} captions: min {cos.min():.6f}, mean {cos.mean():.6f}")
ratio = out.text_embeds.norm(dim=-1) / z_t.norm(dim=-1)
print(f"z_t: norm(diffusers') / norm(embed's): {ratio.min():.6f} … {ratio.max():.6f} "
      f"(embed's mean norm {z_t.norm(dim=-1).mean():.4f}{', raw' if raw else ''})")
real = ids.attention_mask.sum(-1)
lengths_equal = all(int(r) == t.shape[0] for r, t in zip(real, tokens))
worst = max((out.last_hidden_state[i, : t.shape[0]] - t).abs().max().item() for i, t in enumerate(tokens))
print(f"token features: the mask's lengths equal the stored ones: {lengths_equal}; "
      f"max |diffusers − embed| {worst:.2e} (embed stores float16)")

# The denoisers on the reference's inputs, the captions encoded by the exported text encoder.
from safetensors.torch import load_file
ref = load_file(reference)
captions_ref = ["a red circle", "a small blue square and a large yellow star"]
ids = pipe.tokenizer(captions_ref, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
mask = ids.attention_mask.bool()
def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()
with torch.no_grad():
    text = pipe.text_encoder(ids.input_ids)
    z_t_ref, hidden = text.text_embeds, text.last_hidden_state
    print(f"z_t against the reference's: max relative difference {rel(z_t_ref, ref['z_t']):.2e}")
    t = ref["t"]
    prior_out = pipe.prior(ref["prior_x"], timestep=t, proj_embedding=z_t_ref,
                           encoder_hidden_states=hidden, attention_mask=mask).predicted_image_embedding
    print(f"prior: max relative difference {rel(prior_out, ref['prior_out']):.2e}")
    states, added = pipe.text_proj(image_embeddings=ref["z_i"], prompt_embeds=z_t_ref,
                                   text_encoder_hidden_states=hidden, do_classifier_free_guidance=False)
    extra = pipe.text_proj.clip_extra_context_tokens
    decoder_out = pipe.decoder(ref["decoder_x"], t, encoder_hidden_states=states, class_labels=added,
                               attention_mask=F.pad(mask, (extra, 0), value=True)).sample
    print(f"decoder + text_proj: max relative difference {rel(decoder_out, ref['decoder_out']):.2e}")
    side = pipe.super_res_first.config.sample_size
    up = F.interpolate(ref["low"], size=[side, side], mode="bicubic", align_corners=False, antialias=True)
    for name in ["super_res_first", "super_res_last"]:
        out = getattr(pipe, name)(torch.cat([ref["upsampler_x"], up], 1), t).sample
        print(f"{name}: max relative difference {rel(out, ref['upsampler_out']):.2e}")

g = torch.Generator().manual_seed(0)
images = pipe(captions[:2], num_images_per_prompt=2, generator=g, prior_num_inference_steps=25,
              decoder_num_inference_steps=25, super_res_num_inference_steps=7, output_type="np").images
print(f"pipeline: {images.shape[0]} images of {images.shape[1]}×{images.shape[2]} for {captions[:2]}")
grid = np.concatenate([np.concatenate(list(images[i * 2:(i + 1) * 2]), axis=1) for i in range(2)], axis=0)
from PIL import Image
Image.fromarray((grid * 255).round().astype(np.uint8)).save(out_png)
print(f"wrote {out_png}")
