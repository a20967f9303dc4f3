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
    timesteps: "torch.Tensor | None" = None,
    extra_channels: "torch.Tensor | None" = None,
    after_step: Callable[[int, "torch.Tensor"], "torch.Tensor"] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> "torch.Tensor":
    """Run the sampler from the starting latents to a clean latent.

    `latents` (B, 4, h, w) are the starting latents, already scaled for the scheduler (pure noise
    times `init_noise_sigma` for txt2img, a noised image latent for img2img). `cond`/`uncond` are
    (B, 77, D) text embeddings (`uncond` None disables guidance). The scheduler must already have
    its timesteps set; `timesteps` (default: all of them) is the tail to run (img2img strength).
    `extra_channels` (B, C', h, w) are concatenated to the UNet input after scaling (the mask and
    masked-image latents of 9-channel inpainting models). `after_step(i, latents)` may replace the
    latents after step i (legacy inpainting re-imposes the known region there).
    """
    import torch

    extra = step_kwargs(scheduler, eta=eta, generators=generators)
    if timesteps is None:
        timesteps = scheduler.timesteps
    context = cond if uncond is None else torch.cat([uncond, cond])  # (2B, 77, D): [uncond; cond]
    if extra_channels is not None and uncond is not None:
        extra_channels = torch.cat([extra_channels, extra_channels])  # (2B, C', h, w)
    for i, t in enumerate(timesteps):
        model_input = latents if uncond is None else torch.cat([latents, latents])
        model_input = scheduler.scale_model_input(model_input, t)
        if extra_channels is not None:
            model_input = torch.cat([model_input, extra_channels], dim=1)  # (2B, 4 + C', h, w)
        noise_pred = unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
        if uncond is not None:
            noise_uncond, noise_cond = noise_pred.chunk(2)
            # Classifier-free guidance (Ho & Salimans 2022): eps_u + s * (eps_c - eps_u).
            noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if after_step is not None:
            latents = after_step(i, latents)
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents
