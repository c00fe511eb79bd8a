"""Adjustments to a diffusers UnCLIPPipeline that the checks and fixtures comparing it with this
framework share."""
import math

import torch
import torch.nn.functional as F


def float64_tables(pipe):
    """Every scheduler's tables in float64, as this framework keeps them. diffusers' float32 ones
    make the last step scale x_0 by beta_0 / (1 - alphabar_0) = 0.99947 instead of 1
    (1 - alphabar_0 is 4e-5, where float32 keeps three digits)."""
    for scheduler in (pipe.prior_scheduler, pipe.decoder_scheduler, pipe.super_res_scheduler):
        steps = scheduler.config.num_train_timesteps
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        scheduler.betas = torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                                        for i in range(steps)], dtype=torch.float64)
        scheduler.alphas = 1.0 - scheduler.betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)


def normalise_text_embeds(pipe):
    """The text encoder wrapped to L2-normalise z_t: what runs trained on normalised embeddings
    (the default clip_embeddings) take, where diffusers feeds the projection as it comes."""
    encode = pipe.text_encoder.forward

    def normalised(*args, **kwargs):
        out = encode(*args, **kwargs)
        out.text_embeds = F.normalize(out.text_embeds, dim=-1)
        return out

    pipe.text_encoder.forward = normalised
