"""Regressions found in review: VAE moved to the CPU under a half-precision budget, seamless tiling
with a tiled VAE, hires sizes from the HTTP API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.engine.planner import PlanRequest, candidate_plans
from leansd.errors import InvalidRequestError
from tests.helpers import tiny_bundle


def test_vae_on_cpu_by_plan_works_in_bf16() -> None:
    # Without efficient attention the tiny model's VAE stage outweighs its text stage at 128x128.
    probe = Engine(tiny_bundle(), device="cpu", precision="bf16", prompt_cache=False, vram=None)
    plans = candidate_plans(probe.sizes, PlanRequest(width=128, height=128, batch=1, passes=2), None)
    cpu_vae_peak = min(p.peak for _, p in plans if p.vae_on_cpu)
    budget = int(cpu_vae_peak / 0.9) + 16  # room for the plan with the VAE on the CPU, not more
    assert budget < min(p.peak for _, p in plans if not p.vae_on_cpu) / 0.9
    engine = Engine(tiny_bundle(), device="cpu", precision="bf16", prompt_cache=False, vram=budget,
                    virtual_device=True, efficient_attention=False)
    result = engine.generate(GenerationRequest(prompt="a", width=128, height=128, num_inference_steps=2, seed=1),
                             progress_bar=False)
    assert engine.plan.vae_on_cpu
    assert np.isfinite(result.pixels).all() and result.pixels.std() > 0.01


def tiled_vae_budget(size: int, bundle=None) -> int:
    probe = Engine(bundle or tiny_bundle(), device="cpu", precision="full", prompt_cache=False, vram=None)
    plans = candidate_plans(probe.sizes, PlanRequest(width=size, height=size, efficient_attention=True), None)
    return int(min(p.peak for _, p in plans if p.vae_tile and not p.vae_on_cpu) / 0.9) + 1  # tiles the VAE


def test_seamless_tiling_with_a_tiled_vae_gives_the_whole_vae_picture() -> None:
    """The exact tiles read their halos across the image edge, as circular padding does."""
    request = GenerationRequest(prompt="a", width=128, height=128, num_inference_steps=2, seed=1, tiling=True)
    whole = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, vram=None)
    expected = whole.generate(request, progress_bar=False).pixels
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, vram=tiled_vae_budget(128),
                    virtual_device=True)
    result = engine.generate(request, progress_bar=False)
    assert engine.plan.vae_tile is not None and engine.plan.vae_tile < 128, engine.plan.describe()
    np.testing.assert_allclose(result.pixels, expected, atol=5e-5, rtol=0)  # fp32 summation order only
    # ...and not the picture without wrapping: the tiles really wrapped.
    plain = whole.generate(GenerationRequest(prompt="a", width=128, height=128, num_inference_steps=2, seed=1),
                           progress_bar=False).pixels
    assert np.abs(plain - expected).max() > 0.01


def test_seamless_tiling_refuses_diffusers_tiles() -> None:
    """A VAE the exact path does not know falls back to diffusers' tiles, which cannot wrap."""
    bundle = tiny_bundle()
    bundle.vae.decoder.conv_out = torch.nn.Sequential(bundle.vae.decoder.conv_out)  # same maths, unknown layout
    engine = Engine(bundle, device="cpu", precision="full", prompt_cache=False, vram=tiled_vae_budget(128, bundle),
                    virtual_device=True)
    assert not engine.sizes.vae_exact_tiles
    request = GenerationRequest(prompt="a", width=128, height=128, num_inference_steps=1, seed=1)
    with pytest.raises(InvalidRequestError, match="seamless tiling needs the whole image in one VAE pass"):
        engine.generate(GenerationRequest(prompt="a", width=128, height=128, num_inference_steps=1, seed=1,
                                          tiling=True), progress_bar=False)
    # The failed request restored the padding: the next plain request works.
    assert engine.generate(request, progress_bar=False).images[0].size == (128, 128)


def test_vae_activations_are_planned_at_the_vae_dtype() -> None:
    from dataclasses import replace

    from leansd.engine.planner import vae_activation

    engine = Engine(tiny_bundle(), device="cpu", precision="fp16", prompt_cache=False, vram=None)
    half = engine.sizes
    request = PlanRequest(width=128, height=128, batch=1, passes=2)
    full = replace(half, vae_dtype_bytes=4)  # the VAE in fp32 after the NaN fallback
    # The work doubles with the element size; the decoded image's float32 copy does not.
    assert 1.9 * vae_activation(half, request, tile=None) < vae_activation(full, request, tile=None) < 2 * vae_activation(half, request, tile=None)
