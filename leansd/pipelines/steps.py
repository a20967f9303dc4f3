"""Step functions shared by the task pipelines (txt2img now; img2img and inpaint reuse them)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import leansd
from leansd.errors import InvalidRequestError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest

logger = logging.getLogger(__name__)


def resolve_size(engine: "Engine", request: "GenerationRequest") -> tuple[int, int]:
    """(width, height) in pixels: the request's, else the model's native size."""
    width = request.width or engine.bundle.default_size
    height = request.height or engine.bundle.default_size
    factor = engine.bundle.vae_scale_factor
    if width % factor or height % factor:
        raise InvalidRequestError(f"width and height must be multiples of {factor} for this model")
    return width, height


def encode_conditioning(
    engine: "Engine", request: "GenerationRequest"
) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """(cond, uncond) text embeddings, each (1, 77, D) in the engine's dtype; uncond None without CFG."""
    from leansd.prompts.encode import encode_prompts
    from leansd.sampling.loop import uses_guidance

    bundle = engine.bundle
    guided = uses_guidance(request.guidance_scale, bundle.unet)
    if request.negative_prompt and not guided:
        logger.warning("the negative prompt has no effect: guidance is off at CFG scale %g (<= 1)", request.guidance_scale)
    texts = [request.prompt, request.negative_prompt] if guided else [request.prompt]
    with engine.compute():
        hidden = encode_prompts(
            texts, tokenizer=bundle.tokenizer, text_encoder=bundle.text_encoder, device=engine.device
        )
    hidden = hidden.to(engine.dtype)
    return hidden[:1], (hidden[1:2] if guided else None)


def sample_latents(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    seeds: list[int],
    width: int,
    height: int,
    cond: "torch.Tensor",
    uncond: "torch.Tensor | None",
    on_step: Callable[[int, int], None] | None = None,
) -> "torch.Tensor":
    """Denoise one batch (one image per seed) from the seeds' CPU noise; returns (B, 4, h, w)."""
    from leansd.sampling.loop import denoise
    from leansd.sampling.noise import image_generators, initial_noise
    from leansd.sampling.samplers import build_scheduler

    bundle = engine.bundle
    factor = bundle.vae_scale_factor
    generators = image_generators(seeds)
    noise = initial_noise(generators, channels=bundle.latent_channels, height=height // factor, width=width // factor)
    scheduler = build_scheduler(request.sampler, bundle.scheduler_config, seeds=seeds)
    try:
        scheduler.set_timesteps(request.num_inference_steps, device=engine.device)
    except ValueError as exc:  # a scheduler-specific limit the request checks did not know
        raise InvalidRequestError(f"{request.sampler} cannot run {request.num_inference_steps} steps: {exc}") from None
    batch = len(seeds)
    with engine.compute():
        return denoise(
            unet=bundle.unet,
            scheduler=scheduler,
            latents=noise.to(device=engine.device, dtype=engine.dtype),
            cond=cond.expand(batch, -1, -1),
            uncond=None if uncond is None else uncond.expand(batch, -1, -1),
            guidance_scale=request.guidance_scale,
            generators=generators,
            eta=request.eta,
            on_step=on_step,
        )


def decode_latents(engine: "Engine", latents: "torch.Tensor") -> "np.ndarray":
    """VAE decode to float32 RGB in [0, 1], (B, H, W, 3) on the CPU."""
    vae = engine.bundle.vae
    with engine.compute():
        image = vae.decode(latents.to(engine.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    image = (image.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W) from [-1, 1] to [0, 1]
    return image.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def to_pil(pixels: "np.ndarray") -> list["Image.Image"]:
    """Float [0, 1] (B, H, W, 3) -> 8-bit PIL images (rounded, as diffusers does)."""
    from PIL import Image

    return [Image.fromarray((p * 255).round().astype("uint8")) for p in pixels]


def infotext_for(
    engine: "Engine", request: "GenerationRequest", *, seed: int, width: int, height: int
) -> str:
    """AUTOMATIC1111 "parameters" text for one image."""
    from leansd.outputs.infotext import build_infotext

    extra: dict[str, object] = {}
    if request.sampler == "DDIM" and request.eta:
        extra["Eta"] = request.eta
    if engine.bundle.is_random:
        extra["Note"] = "random test model, noise image"
    extra["Version"] = f"leansd {leansd.__version__}"
    return build_infotext(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.num_inference_steps,
        sampler=request.sampler,
        cfg_scale=request.guidance_scale,
        seed=seed,
        width=width,
        height=height,
        model_hash=engine.bundle.hash,
        model_name=engine.bundle.name,
        extra=extra,
    )
