"""One memory plan per batch: made from the request (size, batch, UNet passes, the hires pass's size)
before the text stage, and every stage of the batch (text, UNet, VAE decode/encode) runs by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.engine.planner import PlanRequest, candidate_plans, vae_activation
from tests.helpers import tiny_bundle

SIZE = 64


def engine(**memory) -> Engine:
    memory.setdefault("efficient_attention", False)
    return Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, **memory)


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=2, sampler="Euler", seed=5,
                width=SIZE, height=SIZE)
    base.update(kw)
    return GenerationRequest(**base)


def watch_stages(e: Engine) -> list[tuple[str, int, object]]:
    """(stage, accounted activation bytes, the engine's plan) each time the text encoder, the UNet,
    the VAE decoder or the VAE encoder starts a forward pass (hooks on their first layers)."""
    seen: list[tuple[str, int, object]] = []
    bundle = e.bundle
    firsts = {"text": bundle.text_encoder.get_input_embeddings(), "unet": bundle.unet.conv_in,
              "vae-decode": bundle.vae.decoder.conv_in, "vae-encode": bundle.vae.encoder.conv_in}
    for name, module in firsts.items():
        module.register_forward_pre_hook(
            lambda _m, _a, name=name: seen.append((name, e.memory.activation, e.plan)))
    return seen


def tight_budget(plan_request: PlanRequest) -> int:
    """A budget just above the smallest plan for this request: placements change between stages."""
    sizes = engine().sizes
    return int(min(p.peak for _, p in candidate_plans(sizes, plan_request, None)) * 1.25)


def test_one_plan_per_batch_and_every_stage_runs_by_it() -> None:
    req = request(batch_size=2, n_iter=3)
    e = engine(vram=tight_budget(PlanRequest(width=SIZE, height=SIZE, batch=2)), virtual_device=True)
    seen = watch_stages(e)
    before = e.plans_made
    result = e.generate(req, progress_bar=False)
    assert e.plans_made - before == 3  # n_iter batches, one plan each (not one per stage)
    plan = e.plan
    assert plan.request == PlanRequest(width=SIZE, height=SIZE, batch=2, passes=2, efficient_attention=False)
    assert result.memory_plan == plan.describe() and "for 64x64, batch 2" in result.memory_plan
    stages = [name for name, _, _ in seen]
    assert stages.count("text") >= 1 and stages.count("unet") == 3 * 2 * (1 if plan.cfg_batched else 2)  # batches x steps
    assert stages.count("vae-decode") == 3
    for name, activation, current in seen:
        stage = name.split("-")[0]
        # Each stage accounts the activation its batch's plan estimated; the text stage too (it no
        # longer plans at the smallest size), so a plan is the same object all through its batch.
        assert current.request == plan.request and activation == current.activations[stage], (name, current)
    assert result.memory_peak_bytes <= e.budget


def test_and_prompt_plans_its_unet_passes_before_the_text_stage() -> None:
    e = engine(vram="1G", virtual_device=True)
    seen = watch_stages(e)
    e.generate(request(prompt="a red fox AND a blue bird :0.5"), progress_bar=False)
    assert e.plan.request.passes == 3  # the negative and two AND parts, known from the parse alone
    assert {plan.request.passes for _, _, plan in seen} == {3}


@pytest.mark.parametrize("upscaler", ["lanczos", "latent"])
def test_hires_batch_plans_once_for_both_passes_and_the_vae_at_the_hires_size(upscaler: str) -> None:
    hires = (2 * SIZE, 2 * SIZE)
    req = request(hires_scale=2.0, hires_upscaler=upscaler, hires_strength=0.6)
    expected = engine(vram=None).generate(req, progress_bar=False).pixels
    planned = PlanRequest(width=SIZE, height=SIZE, batch=1, passes=2, hires_width=hires[0], hires_height=hires[1])
    e = engine(vram=tight_budget(planned), virtual_device=True)
    seen = watch_stages(e)
    before = e.plans_made
    result = e.generate(req, progress_bar=False)
    np.testing.assert_allclose(result.pixels, expected, atol=1e-5, rtol=0, err_msg=result.memory_plan)
    assert e.plans_made - before == 1
    plan = e.plan
    assert plan.request == planned and plan.request.image_sizes == ((SIZE, SIZE), hires)
    assert "for 64x64 (hires pass 128x128), batch 1" in plan.describe()
    # The VAE's estimate is the hires pass's (the larger), for decode and (lanczos) encode alike.
    sizes = e.sizes
    at_hires = vae_activation(sizes, planned.at_size(*hires), tile=plan.vae_tile)
    at_first = vae_activation(sizes, planned.at_size(SIZE, SIZE), tile=plan.vae_tile)
    assert plan.activations["vae"] == at_hires > at_first
    vae_runs = [(name, activation, current) for name, activation, current in seen if name.startswith("vae")]
    assert vae_runs and all(act == at_hires and current is plan for _, act, current in vae_runs)
    assert {name for name, _, _ in vae_runs} == ({"vae-decode", "vae-encode"} if upscaler == "lanczos"
                                                  else {"vae-decode"})
    assert all(current is plan for _, _, current in seen)
    assert result.memory_peak_bytes <= e.budget


def test_a_stage_outside_its_batch_plan_is_an_error() -> None:
    e = engine(vram="1G", virtual_device=True)
    latents = torch.zeros(1, 4, 2 * SIZE // 8, 2 * SIZE // 8)
    with e.planned_batches():
        with pytest.raises(RuntimeError, match="ran before its batch's memory plan"):
            e.vae_decode(latents)
        e.plan_batch(width=SIZE, height=SIZE, batch=1, passes=2)
        with pytest.raises(RuntimeError, match=r"vae stage at 128x128 .* made for 64x64"):
            e.vae_decode(latents)
        assert e.vae_decode(latents[..., : SIZE // 8, : SIZE // 8]).shape == (1, 3, SIZE, SIZE)
    # On its own (no generation open) a stage plans for itself, as speed calibration does.
    before = e.plans_made
    assert e.vae_decode(latents).shape == (1, 3, 2 * SIZE, 2 * SIZE)
    assert e.plans_made - before == 1 and e.plan.request.width == 2 * SIZE
