"""Inpainting: regenerate the white part of a mask, keep the rest.

Two methods, chosen by the checkpoint:
- an ordinary SD 1.x UNet (4 channels): after every step the known region is re-imposed from
  the original latent noised to the next timestep (the CompVis/diffusers "legacy" method);
- a 9-channel inpainting UNet: the mask and the masked image's latents are concatenated to the
  UNet input at every step (as diffusers' StableDiffusionInpaintPipeline).
Either way the decoded image is composited with the original outside the (blurred) mask, so
pixels the mask does not touch come back unchanged.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from leansd.errors import InvalidRequestError
from leansd.pipelines.steps import (
    encode_conditioning,
    encode_pixels,
    fit_init_image,
    loop_length,
    make_scheduler,
    noise_for,
    plan_batches,
    run_batches,
    run_denoise,
    strength_timesteps,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest, GenerationResult, ProgressEvent
    from leansd.sampling.loop import StepState


def inpaint(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    progress: Callable[["ProgressEvent"], None] | None = None,
    progress_bar: bool = True,
) -> "GenerationResult":
    import torch

    from leansd.inputs.fill import fill_masked_area
    from leansd.inputs.images import image_to_tensor, mask_to_tensor, prepare_mask
    from leansd.sampling.noise import image_generators

    started = time.perf_counter()
    engine.reset_peak_memory()
    # 1. Fit image and mask to the output size; soft (blurred) and binary masks.
    if request.mask is None:
        raise InvalidRequestError("inpainting needs a mask")
    if request.init_image is None:
        raise InvalidRequestError("inpainting needs an init image")
    init, width, height = fit_init_image(engine, request)
    mask = prepare_mask(request.mask, (width, height), invert=request.invert_mask, blur=request.mask_blur,
                        image_size=request.init_image.size, resize_mode=request.resize_mode)
    soft = mask_to_tensor(mask)  # (1, 1, H, W) in [0, 1], blurred: used for the final composite
    binary = (soft >= 0.5).to(soft.dtype)  # what the model regenerates (diffusers binarises at 0.5)
    pixels = image_to_tensor(init)  # (1, 3, H, W) in [-1, 1]
    start_pixels = image_to_tensor(fill_masked_area(init, mask)) if request.inpainting_fill == "fill" else pixels
    factor = engine.bundle.vae_scale_factor
    latent_mask = torch.nn.functional.interpolate(binary, size=(height // factor, width // factor))  # (1,1,h,w)
    latent_mask = latent_mask.to(device=engine.device, dtype=engine.dtype)
    nine_channel = engine.bundle.is_inpainting
    plan_batches(engine, request, width=width, height=height)  # one memory plan per batch

    # 2. Text conditioning.
    steps = loop_length(engine, request, steps=request.num_inference_steps, strength=request.strength)
    text = encode_conditioning(engine, request, steps=steps)
    engine.synchronize()  # CUDA runs asynchronously: wait so the encode time is its own
    encoded = time.perf_counter()

    # 3. Per batch: the same draw order as diffusers (image latents, noise, masked-image latents).
    def sample_batch(seeds: list[int], on_step: Callable[["StepState"], None]) -> "torch.Tensor":
        batch = len(seeds)
        steps = request.num_inference_steps
        generators = image_generators(seeds)
        scheduler = make_scheduler(engine, request, seeds=seeds, steps=steps)
        timesteps = strength_timesteps(scheduler, steps=steps, strength=request.strength)
        full_strength = request.strength >= 1.0
        image_latents = None
        if not nine_channel or not full_strength:
            image_latents = encode_pixels(engine, start_pixels, generators)  # (B, 4, h, w)
        noise = noise_for(engine, generators, width=width, height=height)
        extra = None
        if nine_channel:
            masked = encode_pixels(engine, pixels * (1 - binary), generators)  # masked area -> grey
            extra = torch.cat([latent_mask.expand(batch, -1, -1, -1), masked], dim=1)  # (B, 5, h, w)
        if image_latents is not None:
            image_latents = apply_latent_fill(engine, request, image_latents, latent_mask, seeds=seeds,
                                              width=width, height=height)
        if len(timesteps) == 0:  # strength 0: nothing to denoise
            assert image_latents is not None  # encoded above: strength 0 is not full strength
            return image_latents
        if full_strength:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))

        after_step = None
        if not nine_channel:
            known = image_latents

            def after_step(i: int, current: "torch.Tensor") -> "torch.Tensor":
                # Legacy inpainting: the known region follows the original, noised to the next step.
                if i < len(timesteps) - 1:
                    proper = scheduler.add_noise(known, noise, timesteps[i + 1 : i + 2])
                else:
                    proper = known
                return (1 - latent_mask) * proper + latent_mask * current

        return run_denoise(engine, request, scheduler=scheduler, latents=latents, generators=generators,
                           text=text, timesteps=timesteps, extra_channels=extra,
                           after_step=after_step, on_step=on_step)

    # 4. Decode, composite onto the original outside the blurred mask, package.
    original = (pixels / 2 + 0.5).permute(0, 2, 3, 1).numpy()  # (1, H, W, 3) in [0, 1]
    weight = soft.permute(0, 2, 3, 1).numpy()  # (1, H, W, 1)

    def composite(decoded: "np.ndarray") -> "np.ndarray":
        return original * (1 - weight) + decoded * weight

    extra_info: dict[str, object] = {"Denoising strength": request.strength, "Mask blur": request.mask_blur}
    if request.inpainting_fill != "original":
        extra_info["Inpainting fill"] = request.inpainting_fill
    if request.invert_mask:
        extra_info["Mask mode"] = "Inpaint not masked"
    return run_batches(
        engine, request, width=width, height=height, sample_batch=sample_batch, text=text, finish=composite,
        extra_info=extra_info, progress=progress, progress_bar=progress_bar, started=started,
        encode_seconds=encoded - started,
    )


def apply_latent_fill(
    engine: "Engine",
    request: "GenerationRequest",
    latents: "torch.Tensor",
    latent_mask: "torch.Tensor",
    *,
    seeds: list[int],
    width: int,
    height: int,
) -> "torch.Tensor":
    """A1111's "latent noise" / "latent nothing": replace the masked area of the starting latents."""
    from leansd.sampling.noise import image_generators

    if request.inpainting_fill == "latent-nothing":
        return latents * (1 - latent_mask)
    if request.inpainting_fill == "latent-noise":
        # Fresh generators: the same noise each seed gives in txt2img (as A1111 draws it from the seeds).
        fresh = noise_for(engine, image_generators(seeds), width=width, height=height)
        return latents * (1 - latent_mask) + fresh * latent_mask
    return latents
