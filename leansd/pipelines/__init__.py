"""One function per task; `generate` picks it from the request (init image, mask)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest, GenerationResult, ProgressEvent


def generate(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    progress: Callable[["ProgressEvent"], None] | None = None,
    progress_bar: bool = True,
) -> "GenerationResult":
    """Run txt2img, img2img or inpaint (with seamless tiling if asked) for a validated request.

    `Engine.generate` validates the request on entry; this takes it as it is.
    """
    from leansd.engine.tiling import seamless_tiling
    from leansd.pipelines.img2img import img2img
    from leansd.pipelines.inpaint import inpaint
    from leansd.pipelines.txt2img import txt2img

    if not request.is_validated:
        raise ValueError("pipelines take a validated request (GenerationRequest.validated); call Engine.generate")
    if request.checkpoint is not None or request.prediction_type is not None:
        # In the job: a switch never races a generation. A prediction type is a load option: same checkpoint,
        # another choice reloads it.
        engine.switch_model(request.checkpoint, prediction_type=request.prediction_type)
    if request.vae is not None:
        engine.set_vae_choice(request.vae)
    if request.refiner_checkpoint is not None and request.refiner_switch_at < 1.0:
        engine.set_refiner(request.refiner_checkpoint)  # loaded once; the same name again is a no-op
    engine.apply_prompt_networks(request.prompt)  # <lora:...> tags: applied before any weight is used
    check_decoders(engine, request)
    task = {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint}[request.task]
    bundle = engine.bundle
    tiling = seamless_tiling(bundle.unet, bundle.vae) if request.tiling else contextlib.nullcontext()
    with tiling, engine.planned_batches():  # one memory plan per batch, made by the task (plan_batches)
        return task(engine, request, progress=progress, progress_bar=progress_bar)


def check_decoders(engine: "Engine", request: "GenerationRequest") -> None:
    """TAESD previews or the TAESD decoder need the engine's TAESD weights: say so before any work."""
    from leansd.errors import InvalidRequestError

    wants = request.vae_decoder == "taesd" or (request.preview_every > 0 and request.preview_method == "taesd")
    if wants and getattr(engine, "taesd", None) is None:
        what = "the TAESD decoder" if request.vae_decoder == "taesd" else "TAESD previews"
        raise InvalidRequestError(
            f"{what} need TAESD weights: load them with --taesd PATH (a diffusers AutoencoderTiny folder) "
            "or a hub id such as madebyollin/taesd"
        )
