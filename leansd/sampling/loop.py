"""The denoising loop with classifier-free guidance. Pure tensor code: no files, no device choice."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from diffusers import SchedulerMixin, UNet2DConditionModel


def step_kwargs(scheduler: "SchedulerMixin", *, eta: float, generators: list["torch.Generator"]) -> dict:
    """Extra `scheduler.step` arguments: eta (DDIM only) and the per-image generators (ancestral noise)."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def uses_guidance(guidance_scale: float, unet: "UNet2DConditionModel") -> bool:
    """CFG runs the unconditional branch only when it changes the result (as diffusers decides)."""
    return guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None


def denoise(
    *,
    unet: "UNet2DConditionModel",
    scheduler: "SchedulerMixin",
    latents: "torch.Tensor",
    cond: "torch.Tensor",
    uncond: "torch.Tensor | None",
    guidance_scale: float,
    generators: list["torch.Generator"],
    eta: float = 0.0,
    on_step: Callable[[int, int], None] | None = None,
) -> "torch.Tensor":
    """Run the sampler from pure noise to a clean latent.

    `latents` (B, 4, h, w) is the unscaled initial noise; `cond`/`uncond` are (B, 77, D) text
    embeddings (`uncond` None disables guidance). The scheduler must already have its timesteps set.
    """
    import torch

    latents = latents * scheduler.init_noise_sigma
    extra = step_kwargs(scheduler, eta=eta, generators=generators)
    timesteps = scheduler.timesteps
    context = cond if uncond is None else torch.cat([uncond, cond])  # (2B, 77, D): [uncond; cond]
    for i, t in enumerate(timesteps):
        model_input = latents if uncond is None else torch.cat([latents, latents])
        model_input = scheduler.scale_model_input(model_input, t)
        noise_pred = unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
        if uncond is not None:
            noise_uncond, noise_cond = noise_pred.chunk(2)
            # Classifier-free guidance (Ho & Salimans 2022): eps_u + s * (eps_c - eps_u).
            noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents
