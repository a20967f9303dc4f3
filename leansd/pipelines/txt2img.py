"""txt2img: prompt -> images."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from leansd.pipelines.steps import (
    decode_latents,
    encode_conditioning,
    infotext_for,
    resolve_size,
    sample_latents,
    to_pil,
)
from leansd.request import GenerationResult, ProgressEvent

if TYPE_CHECKING:
    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest


def txt2img(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
    progress_bar: bool = True,
) -> GenerationResult:
    import numpy as np
    from tqdm.auto import tqdm

    started = time.perf_counter()
    engine.reset_peak_memory()
    # 1. Validate once; fixes the sampler spelling and a random seed if none was given.
    request = request.validated()
    width, height = resolve_size(engine, request)
    seeds = request.image_seeds()

    # 2. Text conditioning, shared by every image of the request.
    cond, uncond = encode_conditioning(engine, request)
    engine.synchronize()  # CUDA runs asynchronously: wait so each stage's time is its own
    encoded = time.perf_counter()

    # 3. Sample and decode batch by batch (n_iter batches of batch_size images).
    pixels = []
    sample_seconds = decode_seconds = 0.0
    for b in range(request.n_iter):
        batch_seeds = seeds[b * request.batch_size : (b + 1) * request.batch_size]
        with tqdm(total=None, desc=f"batch {b + 1}/{request.n_iter}", disable=not progress_bar, leave=False) as bar:

            def on_step(step: int, total: int) -> None:
                bar.total = total
                bar.update(1)
                if progress is not None:
                    progress(ProgressEvent(step=step, total_steps=total, batch_index=b, n_batches=request.n_iter))

            t0 = time.perf_counter()
            latents = sample_latents(
                engine, request, seeds=batch_seeds, width=width, height=height, cond=cond, uncond=uncond, on_step=on_step
            )
            engine.synchronize()  # wait for the queued UNet work before reading the clock
            t1 = time.perf_counter()
        pixels.append(decode_latents(engine, latents))
        sample_seconds += t1 - t0
        decode_seconds += time.perf_counter() - t1

    # 4. Package: 8-bit images, per-image metadata, timings and peak memory.
    all_pixels = np.concatenate(pixels)
    return GenerationResult(
        images=to_pil(all_pixels),
        seeds=seeds,
        infotexts=[infotext_for(engine, request, seed=s, width=width, height=height) for s in seeds],
        request=request,
        pixels=all_pixels,
        timings={
            "encode": encoded - started,
            "sample": sample_seconds,
            "decode": decode_seconds,
            "total": time.perf_counter() - started,
        },
        peak_memory_bytes=engine.peak_memory(),
    )
