"""Memory modes on the CPU with a virtual budget: same pictures, accounting within the budget."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from leansd import Engine, GenerationRequest
from leansd.engine.planner import PlanRequest, candidate_plans, plan_memory
from leansd.errors import InvalidRequestError
from tests.helpers import tiny_bundle, tiny_inpaint_bundle

SIZE = 64


def engine(bundle=None, **memory) -> Engine:
    """A CPU engine planning as on a backend without flash / memory-efficient attention (scores
    counted, attention chunked when the budget needs it), so every memory saving gets exercised."""
    memory.setdefault("efficient_attention", False)
    return Engine(bundle or tiny_bundle(), device="cpu", precision="full", prompt_cache=False, **memory)


def txt2img_request(**kw) -> GenerationRequest:
    base = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.5, seed=5,
                width=SIZE, height=SIZE, batch_size=2)
    base.update(kw)
    return GenerationRequest(**base)


def init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return Image.fromarray(np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8))


def mask_image() -> Image.Image:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:56, 32:56] = 255
    return Image.fromarray(m)


def budgets() -> list[int]:
    """One budget per distinct plan the planner picks for this request, from resident down to the
    minimum (at most 8, spread over that range): every placement and saving it uses gets run."""
    sizes = engine().sizes
    request = PlanRequest(width=SIZE, height=SIZE, batch=2)
    distinct: dict[tuple, int] = {}
    for peak in sorted({p.peak for _, p in candidate_plans(sizes, request, None)}, reverse=True):
        budget = int(peak / 0.9) + 1
        plan = plan_memory(sizes, request, budget)
        key = (plan.placement, plan.cfg_batched, plan.attention_chunk, plan.vae_tile, plan.vae_on_cpu)
        distinct.setdefault(key, budget)
    found = sorted(distinct.values(), reverse=True)
    if len(found) > 8:
        found = [found[round(i * (len(found) - 1) / 7)] for i in range(8)]
    return found


@pytest.fixture(scope="module")
def reference():
    return engine(vram=None).generate(txt2img_request(), progress_bar=False).pixels


@pytest.fixture(scope="module")
def all_budgets():
    return budgets()


def test_budgets_cover_every_placement(all_budgets):
    seen = set()
    for budget in all_budgets:
        e = engine(vram=budget, virtual_device=True)
        seen.add(e.plan_for(width=SIZE, height=SIZE, batch=2).placement)
    # The tiny text encoder (a 49408-token embedding) outweighs its UNet, so streaming the UNet
    # never lowers the tiny model's peak at 64x64; test_minimum_budget_* covers streaming.
    assert {"resident", "stages"} <= seen, seen
    assert len(all_budgets) >= 4  # whole/CPU VAE, batched/split CFG, chunks: several distinct plans


def test_every_budget_gives_same_picture_and_stays_within_it(reference, all_budgets):
    for budget in all_budgets:
        e = engine(vram=budget, virtual_device=True)
        for _ in range(2):  # the second request starts from what the first left placed
            result = e.generate(txt2img_request(), progress_bar=False)
            np.testing.assert_allclose(result.pixels, reference, atol=1e-5, rtol=0, err_msg=result.memory_plan)
            assert result.memory_peak_bytes is not None and 0 < result.memory_peak_bytes <= budget
        assert "memory plan" in result.memory_plan


@pytest.mark.parametrize(
    "memory",
    [dict(memory_policy="medvram"), dict(memory_policy="lowvram"), dict(vae_on_cpu=True), dict(turbo=True, vram="1G"),
     dict(memory_policy="lowvram", vae_on_cpu=True)],
)
def test_presets_give_same_picture(reference, memory):
    e = engine(virtual_device=True, **memory)
    result = e.generate(txt2img_request(), progress_bar=False)
    np.testing.assert_allclose(result.pixels, reference, atol=1e-5, rtol=0)


def test_minimum_budget_drives_every_memory_saving():
    """At 128x128 the attention scores dominate: at the minimum the UNet streams, cond/uncond run
    as two batches and attention is chunked, and the picture is the same."""
    req = txt2img_request(width=128, height=128, num_inference_steps=2)
    expected = engine(vram=None).generate(req, progress_bar=False).pixels
    sizes = engine().sizes
    plan_request = PlanRequest(width=128, height=128, batch=2, vae_on_cpu=True)
    minimum = min(p.peak for _, p in candidate_plans(sizes, plan_request, None, policy="lowvram"))
    e = engine(vram=minimum, turbo=True, vae_on_cpu=True, memory_policy="lowvram", virtual_device=True)
    result = e.generate(req, progress_bar=False)
    assert e.plan.stream_unet and not e.plan.cfg_batched and e.plan.attention_chunk is not None, e.plan.describe()
    np.testing.assert_allclose(result.pixels, expected, atol=1e-5, rtol=0)
    assert result.memory_peak_bytes <= minimum


def test_below_minimum_is_a_clear_error():
    e = engine(vram=1000, virtual_device=True)
    with pytest.raises(InvalidRequestError, match=r"--vram 1M is below the minimum of \d+M for this model at 64x64"):
        e.generate(txt2img_request(), progress_bar=False)


@pytest.mark.parametrize("task", ["img2img", "inpaint", "inpaint9"])
def test_img2img_and_inpaint_modes_give_same_picture(all_budgets, task):
    bundle = tiny_inpaint_bundle if task == "inpaint9" else tiny_bundle
    req = txt2img_request(init_image=init_image(), strength=0.6, batch_size=1)
    if task != "img2img":
        req = txt2img_request(init_image=init_image(), mask=mask_image(), strength=0.8, batch_size=1)
    expected = engine(bundle(), vram=None).generate(req, progress_bar=False).pixels
    for budget in (all_budgets[len(all_budgets) // 2], all_budgets[-1]):
        e = engine(bundle(), vram=budget, turbo=True, virtual_device=True)
        result = e.generate(req, progress_bar=False)
        np.testing.assert_allclose(result.pixels, expected, atol=1e-5, rtol=0)
        assert result.memory_peak_bytes <= budget


def test_budget_ignored_on_cpu_without_virtual_device():
    assert engine(vram="1M").budget is None


def test_accounting_without_budget_reports_resident_weights(reference):
    e = engine(vram=None)
    result = e.generate(txt2img_request(), progress_bar=False)
    assert result.memory_peak_bytes >= e.sizes.unet + e.sizes.vae


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_tiled_vae_budget_gives_same_picture(task):
    """A budget too small for the whole VAE at 256x256 tiles it (decode, and encode for img2img);
    the exact tiles leave the picture unchanged."""
    size = 256
    kw = dict(width=size, height=size, batch_size=1, num_inference_steps=2)
    if task == "img2img":
        kw.update(init_image=init_image().resize((size, size)), strength=0.6)
    req = txt2img_request(**kw)
    expected = engine(vram=None).generate(req, progress_bar=False).pixels
    sizes = engine().sizes
    plans = [p for _, p in candidate_plans(sizes, PlanRequest(width=size, height=size), None)
             if p.vae_tile is not None and not p.vae_on_cpu]
    budget = int(min(p.peak for p in plans) / 0.9) + 1
    e = engine(vram=budget, virtual_device=True)
    result = e.generate(req, progress_bar=False)
    assert e.plan.vae_tile is not None and e.plan.vae_tile < size and not e.plan.vae_on_cpu, e.plan.describe()
    # 5e-5, not 1e-5: the tiles sum in another order (as accurate against a float64 decode, see
    # test_tiled_decode_is_as_accurate_as_untiled), and the random tiny VAE amplifies that ~10x.
    np.testing.assert_allclose(result.pixels, expected, atol=5e-5, rtol=0)
    assert result.memory_peak_bytes <= budget


@pytest.mark.parametrize("placement", ["stream", "stream-layers"])
def test_streaming_blocks_or_layers_gives_same_picture(placement):
    """Block-level and layer-level streaming (and switching between them in one engine). At 256x256
    the UNet stage outweighs the tiny text encoder, so the lowest budgets stream layer by layer."""
    req = txt2img_request(width=256, height=256, batch_size=1, num_inference_steps=2)
    expected = engine(vram=None).generate(req, progress_bar=False).pixels
    sizes = engine().sizes
    request = PlanRequest(width=256, height=256, batch=1)
    plans = candidate_plans(sizes, request, None, policy="lowvram")

    def budget_for(kind: str) -> int:
        return int(min(p.peak for _, p in plans if p.placement == kind) / 0.9) + 1

    e = engine(vram=budget_for(placement), memory_policy="lowvram", virtual_device=True)
    for _ in range(2):
        result = e.generate(req, progress_bar=False)
        assert e.plan.placement == placement, e.plan.describe()
        np.testing.assert_allclose(result.pixels, expected, atol=1e-5, rtol=0)
        assert result.memory_peak_bytes <= budget_for(placement)
    other = "stream" if placement == "stream-layers" else "stream-layers"
    e.set_budget(budget_for(other))
    result = e.generate(req, progress_bar=False)
    assert e.plan.placement == other and e._streaming_layers == (other == "stream-layers")
    np.testing.assert_allclose(result.pixels, expected, atol=1e-5, rtol=0)


def test_cpu_attention_is_never_chunked_by_default():
    """The CPU's SDPA is a flash kernel (no score matrix): chunking it would only cost time."""
    e = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, vram="1G", virtual_device=True)
    plan = e.plan_for(width=512, height=512, batch=1)
    assert plan.attention_chunk is None
    tight = engine(vram=int(plan.peak / 0.9) + 1, virtual_device=True)  # counting scores, the same budget chunks
    assert tight.plan_for(width=512, height=512, batch=1).attention_chunk is not None
