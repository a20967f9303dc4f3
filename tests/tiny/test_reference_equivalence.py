"""Our txt2img loop equals diffusers' StableDiffusionPipeline on the same tiny weights (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.sampling.samplers import build_scheduler
from tests.helpers import tiny_bundle


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_bundle(), device="cpu", precision="full")


def reference_images(engine: Engine, request: GenerationRequest, seeds: list[int]) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    b = engine.bundle
    scheduler = build_scheduler(request.sampler, b.scheduler_config, seeds=seeds)
    pipe = StableDiffusionPipeline(
        vae=b.vae,
        text_encoder=b.text_encoder,
        tokenizer=b.tokenizer,
        unet=b.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        height=request.height,
        width=request.width,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        eta=request.eta,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
    )
    return out.images


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a", "DPM++ 2M Karras", "PLMS", "DPM++ SDE Karras"])
@pytest.mark.parametrize("negative_prompt", ["", "blurry, low quality"])
def test_txt2img_matches_diffusers(engine: Engine, sampler: str, negative_prompt: str) -> None:
    request = GenerationRequest(
        prompt="a photograph of an astronaut riding a horse",
        negative_prompt=negative_prompt,
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=7.5,
        sampler=sampler,
        eta=0.5 if sampler == "DDIM" else 0.0,
        seed=1234,
        batch_size=2,
    )
    ours = engine.generate(request, progress_bar=False)
    ref = reference_images(engine, request, ours.seeds)
    assert ours.seeds == [1234, 1235]
    assert ours.pixels.shape == ref.shape == (2, 64, 64, 3)
    assert np.abs(ours.pixels - ref).max() < 1e-4
    # The images are not trivially constant: the comparison means something.
    assert ref.std() > 0.05
    assert np.abs(ref[0] - ref[1]).max() > 0.05


def test_no_guidance_matches_diffusers(engine: Engine) -> None:
    request = GenerationRequest(
        prompt="a red fox", width=64, height=64, num_inference_steps=3, guidance_scale=1.0, sampler="Euler", seed=7
    )
    ours = engine.generate(request, progress_bar=False)
    ref = reference_images(engine, request, ours.seeds)
    assert np.abs(ours.pixels - ref).max() < 1e-4
