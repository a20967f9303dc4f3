"""img2img: an init image plus a prompt -> images (as diffusers' StableDiffusionImg2ImgPipeline)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from leansd.pipelines.steps import (
    encode_conditioning,
    fit_init_image,
    img2img_latents,
    loop_length,
    plan_batches,
    run_batches,
)

if TYPE_CHECKING:
    import torch

    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest, GenerationResult, ProgressEvent
    from leansd.sampling.loop import StepState


def img2img(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    progress: Callable[["ProgressEvent"], None] | None = None,
    progress_bar: bool = True,
) -> "GenerationResult":
    from leansd.inputs.images import image_to_tensor

    started = time.perf_counter()
    engine.reset_peak_memory()
    # 1. Fit the init image to the output size (resize mode) and make it a tensor.
    init, width, height = fit_init_image(engine, request)
    pixels = image_to_tensor(init)  # (1, 3, H, W) in [-1, 1]
    plan_batches(engine, request, width=width, height=height)  # one memory plan per batch

    # 2. Text conditioning.
    steps = loop_length(engine, request, steps=request.num_inference_steps, strength=request.strength)
    text = encode_conditioning(engine, request, steps=steps)
    engine.synchronize()  # CUDA runs asynchronously: wait so the encode time is its own
    encoded = time.perf_counter()

    # 3. Per batch: encode, noise to the strength's start step, denoise the remaining steps.
    def sample_batch(seeds: list[int], on_step: Callable[["StepState"], None]) -> "torch.Tensor":
        return img2img_latents(engine, request, seeds=seeds, pixels=pixels, strength=request.strength,
                               steps=request.num_inference_steps, text=text, on_step=on_step)

    # 4. Decode and package.
    return run_batches(
        engine, request, width=width, height=height, sample_batch=sample_batch, text=text,
        extra_info={"Denoising strength": request.strength},
        progress=progress, progress_bar=progress_bar, started=started, encode_seconds=encoded - started,
    )
