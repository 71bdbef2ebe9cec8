"""The denoising loss Stable Diffusion fine-tuning minimises, with the usual options.

    latents x0 (VAE sample × scaling factor), t ~ U{0..T-1}, noise ε ~ N(0, I) (+ offset·N(0, 1) per channel)
    x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε;  target = ε (epsilon) or v = √ᾱ_t·ε − √(1-ᾱ_t)·x0 (v_prediction)
    loss_i = w_i · mean (unet(x_t, t, text) − target)²,  w = min(snr, γ)/snr (ε) or min(snr, γ)/(snr+1) (v), snr = ᾱ/(1-ᾱ)
"""

from __future__ import annotations

import torch


def snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for timesteps t."""
    a = alphas_cumprod.to(t.device)[t].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def draw(scheduler, latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0):
    """(noise, timesteps) for a batch of latents, all from `generator`, so a step is a function of its seed; drawn
    for the whole global batch, so any split of it over processes trains the same."""
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    return noise, t


def denoising_loss(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   snr_gamma: float | None = None, cond: dict | None = None) -> torch.Tensor:
    """Per-example loss (shape [batch]) of `unet` predicting the `noise` (or v) added to `latents` at steps `t`;
    `cond` holds extra UNet inputs (SDXL's added_cond_kwargs)."""
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"prediction type {kind!r} is not supported (epsilon, v_prediction)")
    pred = unet(noisy, t, encoder_hidden_states=text, **(cond or {})).sample
    loss = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    if snr_gamma:
        loss = loss * snr_weights(scheduler.alphas_cumprod, t, snr_gamma, kind)
    return loss
