"""txt2img: prompt -> images, with an optional upscaled second pass (hires fix)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from leansd.pipelines.steps import (
    decode_latents,
    encode_conditioning,
    img2img_latents,
    loop_length,
    make_scheduler,
    noise_for,
    plan_batches,
    refine_latents,
    resolve_size,
    run_batches,
    run_denoise,
    to_pil,
)

if TYPE_CHECKING:
    import torch

    from leansd.engine.engine import Engine
    from leansd.pipelines.steps import PromptConditioning
    from leansd.request import GenerationRequest, GenerationResult, ProgressEvent
    from leansd.sampling.loop import StepState


def txt2img(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    progress: Callable[["ProgressEvent"], None] | None = None,
    progress_bar: bool = True,
) -> "GenerationResult":
    from leansd.sampling.noise import image_generators

    started = time.perf_counter()
    engine.reset_peak_memory()
    # 1. Sizes of both passes (the request was validated on entry to Engine.generate).
    width, height = resolve_size(engine, request)
    hires_size = hires_target(request, width=width, height=height)
    plan_batches(engine, request, width=width, height=height, hires=hires_size)  # one memory plan per batch

    # 2. Text conditioning, shared by every image of the request.
    text = encode_conditioning(engine, request, steps=loop_length(engine, request, steps=request.num_inference_steps))
    second_pass_text = text.for_second_pass() if hires_size is not None else None
    engine.synchronize()  # CUDA runs asynchronously: wait so the encode time is its own
    encoded = time.perf_counter()

    # 3. Per batch: denoise from each seed's noise; optionally upscale and refine (second pass).
    def sample_batch(seeds: list[int], on_step: Callable[["StepState"], None]) -> "torch.Tensor":
        generators = image_generators(seeds)
        scheduler = make_scheduler(engine, request, seeds=seeds, steps=request.num_inference_steps)
        latents = noise_for(engine, generators, width=width, height=height) * scheduler.init_noise_sigma
        latents = run_denoise(engine, request, scheduler=scheduler, latents=latents, generators=generators,
                              text=text, on_step=on_step)
        if hires_size is not None and second_pass_text is not None:
            latents = hires_pass(engine, request, latents, seeds=seeds, size=hires_size,
                                 text=second_pass_text, on_step=on_step)
        return latents

    # 4. Decode each batch and package images, seeds, metadata and timings.
    out_width, out_height = hires_size or (width, height)
    return run_batches(
        engine, request, width=width, height=height, sample_batch=sample_batch, text=text,
        extra_info=hires_info(request, out_width, out_height) if hires_size else None,
        progress=progress, progress_bar=progress_bar, started=started, encode_seconds=encoded - started,
    )


def hires_target(request: "GenerationRequest", *, width: int, height: int) -> tuple[int, int] | None:
    """Size of the second pass: an explicit width/height, or the first pass scaled (multiple of 8)."""
    from leansd.errors import InvalidRequestError
    from leansd.request import MAX_SIZE, MIN_SIZE

    if not request.hires:
        return None
    if request.hires_scale is not None:
        w2, h2 = (int(round(side * request.hires_scale / 8)) * 8 for side in (width, height))
    else:
        # One side given: keep the aspect ratio, as AUTOMATIC1111's "Resize width/height to".
        w2 = request.hires_width or int(round(width * (request.hires_height or height) / height / 8)) * 8
        h2 = request.hires_height or int(round(height * (request.hires_width or width) / width / 8)) * 8
    if max(w2, h2) > MAX_SIZE or min(w2, h2) < MIN_SIZE:
        raise InvalidRequestError(
            f"the hires pass would be {w2}x{h2}; each side must be between {MIN_SIZE} and {MAX_SIZE}"
        )
    return w2, h2


def hires_info(request: "GenerationRequest", width: int, height: int) -> dict[str, object]:
    info: dict[str, object] = {"Denoising strength": request.hires_strength}
    if request.hires_scale is not None:
        info["Hires upscale"] = request.hires_scale
    else:
        info["Hires resize"] = f"{width}x{height}"
    info["Hires steps"] = request.hires_steps or request.num_inference_steps
    info["Hires upscaler"] = "Latent" if request.hires_upscaler == "latent" else "Lanczos"
    return info


def hires_pass(
    engine: "Engine",
    request: "GenerationRequest",
    latents: "torch.Tensor",
    *,
    seeds: list[int],
    size: tuple[int, int],
    text: "PromptConditioning",
    on_step: Callable[["StepState"], None],
) -> "torch.Tensor":
    """Second pass: upscale the first pass and run img2img on it at `hires_strength`.

    "lanczos" decodes, resizes the 8-bit images with Lanczos and re-encodes them (exactly img2img
    of the upscaled images with the same seeds); "latent" resizes the latents bilinearly.
    """
    import torch
    from PIL import Image

    from leansd.inputs.images import image_to_tensor

    width, height = size
    steps = request.hires_steps or request.num_inference_steps
    if request.hires_upscaler == "latent":
        from leansd.sampling.noise import image_generators

        factor = engine.bundle.vae_scale_factor
        upscaled = torch.nn.functional.interpolate(
            latents.float(), size=(height // factor, width // factor), mode="bilinear"
        ).to(engine.dtype)  # (B, 4, H'/8, W'/8)
        scheduler = make_scheduler(engine, request, seeds=seeds, steps=steps)
        return refine_latents(engine, request, upscaled, scheduler=scheduler, generators=image_generators(seeds),
                              steps=steps, strength=request.hires_strength, text=text, on_step=on_step)
    images = to_pil(decode_latents(engine, latents))
    pixels = torch.cat([image_to_tensor(im.resize((width, height), Image.Resampling.LANCZOS)) for im in images])
    return img2img_latents(engine, request, seeds=seeds, pixels=pixels, strength=request.hires_strength,
                           steps=steps, text=text, on_step=on_step)
