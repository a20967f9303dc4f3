"""The denoising loop with classifier-free guidance. Pure tensor code: no files, no device choice."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from diffusers import SchedulerMixin, UNet2DConditionModel

    from leansd.prompts.conditioning import ConditioningPlan


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


def rescale_guidance(guided: "torch.Tensor", conditional: "torch.Tensor", amount: float) -> "torch.Tensor":
    """Guidance rescale (Lin et al. 2023, eq. 15-16, as diffusers): match the guided prediction's
    per-image standard deviation to the conditional one's, mixed in by ``amount`` (0..1)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return amount * rescaled + (1 - amount) * guided


def denoise(
    *,
    unet: "UNet2DConditionModel",
    scheduler: "SchedulerMixin",
    latents: "torch.Tensor",
    plan: "ConditioningPlan",
    guidance_scale: float,
    generators: list["torch.Generator"],
    eta: float = 0.0,
    timesteps: "torch.Tensor | None" = None,
    extra_channels: "torch.Tensor | None" = None,
    after_step: Callable[[int, "torch.Tensor"], "torch.Tensor"] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    guidance_rescale: float = 0.0,
    time_ids: "torch.Tensor | None" = None,
) -> "torch.Tensor":
    """Run the sampler from the starting latents to a clean latent.

    `latents` (B, 4, h, w) are the starting latents, already scaled for the scheduler (pure noise
    times `init_noise_sigma` for txt2img, a noised image latent for img2img). `plan` gives the text
    conditioning of every loop step (prompt editing, alternation, `AND` parts) and must cover
    `len(timesteps)` steps. The scheduler must already have its timesteps set; `timesteps`
    (default: all of them) is the tail to run (img2img strength). `extra_channels` (B, C', h, w)
    are concatenated to the UNet input after scaling (the mask and masked-image latents of
    9-channel inpainting models). `after_step(i, latents)` may replace the latents after step i
    (legacy inpainting re-imposes the known region there). `guidance_rescale` > 0 applies
    :func:`rescale_guidance` to the guided prediction (against the single conditional prediction, or
    the unscaled sum of the AND parts). `time_ids` (1, 6): SDXL's added conditioning (original size,
    crop, target size), sent with each step's pooled text embeddings when the plan has them.
    """
    import torch

    from leansd.prompts.conditioning import combine_guidance

    extra = step_kwargs(scheduler, eta=eta, generators=generators)
    if timesteps is None:
        timesteps = scheduler.timesteps
    batch = latents.shape[0]
    # The unconditional pass runs only when guidance changes the result, or for AND prompts.
    guided = uses_guidance(guidance_scale, unet) or plan.is_composable
    last = None
    for i, t in enumerate(timesteps):
        step = plan.at(i)
        if step is not last:  # steps that share a conditioning share one context tensor
            last = step
            context = step.context(batch, include_uncond=guided)  # (k*B, 77c, D): [uncond; cond_1; ...]
            passes = context.shape[0] // batch
            pooled = step.pooled_context(batch, include_uncond=guided)  # (k*B, P) or None
            added = {} if pooled is None or time_ids is None else {
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}
            }
            extra_in = None if extra_channels is None else torch.cat([extra_channels] * passes)  # (k*B, C', h, w)
        model_input = torch.cat([latents] * passes) if passes > 1 else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if extra_in is not None:
            model_input = torch.cat([model_input, extra_in], dim=1)  # (k*B, 4 + C', h, w)
        noise_pred = unet(model_input, t, encoder_hidden_states=context, return_dict=False, **added)[0]
        if guided:
            noise_uncond, *noise_conds = noise_pred.chunk(passes)
            # Classifier-free guidance (Ho & Salimans 2022), summed over AND parts (Liu et al. 2022).
            noise_pred = combine_guidance(noise_uncond, noise_conds, step.weights, guidance_scale)
            if guidance_rescale > 0:
                single = len(noise_conds) == 1 and step.weights == (1.0,)
                reference = noise_conds[0] if single else combine_guidance(noise_uncond, noise_conds, step.weights, 1.0)
                noise_pred = rescale_guidance(noise_pred, reference, guidance_rescale)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if after_step is not None:
            latents = after_step(i, latents)
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents
