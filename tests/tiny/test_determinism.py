"""Seeds: same seed -> same bytes; batch position and n_iter do not change an image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from tests.helpers import tiny_bundle


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_bundle(), device="cpu", precision="full")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def base(**kw) -> GenerationRequest:
    defaults = dict(prompt="a red fox in the snow", width=64, height=64, num_inference_steps=3, sampler="Euler a", seed=42)
    defaults.update(kw)
    return GenerationRequest(**defaults)


def test_same_seed_same_png_bytes(engine: Engine) -> None:
    a = engine.generate(base(), progress_bar=False)
    b = engine.generate(base(), progress_bar=False)
    assert png_bytes(a.images[0]) == png_bytes(b.images[0])
    c = engine.generate(base(seed=43), progress_bar=False)
    assert np.abs(a.pixels - c.pixels).max() > 0.05


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM", "DPM++ SDE Karras"])
def test_batch_item_equals_single_run(engine: Engine, sampler: str) -> None:
    batch = engine.generate(base(sampler=sampler, eta=1.0, batch_size=3), progress_bar=False)
    assert batch.seeds == [42, 43, 44]
    for i, seed in enumerate(batch.seeds):
        single = engine.generate(base(sampler=sampler, eta=1.0, seed=seed), progress_bar=False)
        np.testing.assert_allclose(batch.pixels[i], single.pixels[0], atol=1e-5)


def test_n_iter_continues_seeds(engine: Engine) -> None:
    r = engine.generate(base(batch_size=2, n_iter=2), progress_bar=False)
    assert r.seeds == [42, 43, 44, 45]
    single = engine.generate(base(seed=45), progress_bar=False)
    np.testing.assert_allclose(r.pixels[3], single.pixels[0], atol=1e-5)


def test_fixed_code_reuses_the_first_batch_noise(engine: Engine) -> None:
    r = engine.generate(base(batch_size=2, n_iter=2, fixed_code=True, sampler="DDIM"), progress_bar=False)
    assert r.seeds == [42, 43, 42, 43]
    np.testing.assert_allclose(r.pixels[0], r.pixels[2], atol=1e-6)
    np.testing.assert_allclose(r.pixels[1], r.pixels[3], atol=1e-6)
    assert np.abs(r.pixels[0] - r.pixels[1]).max() > 0.05


def test_initial_noise_contract() -> None:
    from leansd.sampling.noise import image_generators, initial_noise

    noise = initial_noise(image_generators([5, 6]), channels=4, height=8, width=8)
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(6), dtype=torch.float32)
    assert noise.dtype == torch.float32
    assert torch.equal(noise[1:2], expected)


def test_random_seed_is_reported_and_reproduces(engine: Engine) -> None:
    r = engine.generate(base(seed=None), progress_bar=False)
    assert 0 <= r.seeds[0] < 2**32
    again = engine.generate(base(seed=r.seeds[0]), progress_bar=False)
    assert png_bytes(r.images[0]) == png_bytes(again.images[0])
    assert f"Seed: {r.seeds[0]}," in r.infotexts[0]


def test_guidance_and_negative_prompt_change_the_image(engine: Engine) -> None:
    plain = engine.generate(base(), progress_bar=False).pixels
    neg = engine.generate(base(negative_prompt="snow"), progress_bar=False).pixels
    nocfg = engine.generate(base(guidance_scale=1.0), progress_bar=False).pixels
    assert np.abs(plain - neg).max() > 1e-3
    assert np.abs(plain - nocfg).max() > 1e-3


def test_result_metadata(engine: Engine) -> None:
    r = engine.generate(base(negative_prompt="blurry", sampler="dpmpp_2m_karras"), progress_bar=False)
    assert r.request.sampler == "DPM++ 2M Karras"
    assert r.images[0].size == (64, 64)
    info = r.infotexts[0]
    assert info.startswith("a red fox in the snow\nNegative prompt: blurry\n")
    assert "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 64x64" in info
    assert set(r.timings) == {"encode", "sample", "decode", "total"}
    assert r.peak_memory_bytes is None  # CPU: no device accounting


def test_default_size_is_the_models(engine: Engine) -> None:
    r = engine.generate(base(width=None, height=None, num_inference_steps=1), progress_bar=False)
    assert r.images[0].size == (engine.bundle.default_size, engine.bundle.default_size)
    r = engine.generate(base(width=96, height=64, num_inference_steps=1), progress_bar=False)
    assert r.images[0].size == (96, 64)


def test_progress_callback_can_skip_and_stop(engine: Engine) -> None:
    from leansd.request import SkipBatch, StopGeneration

    events = []

    def skip_second(event):
        events.append((event.batch_index, event.step, event.total_steps))
        if event.batch_index == 1:
            raise SkipBatch

    r = engine.generate(base(batch_size=1, n_iter=3), progress=skip_second, progress_bar=False)
    assert r.seeds == [42, 44] and len(r.images) == 2 and r.info["interrupted"] is True
    assert events[:3] == [(0, 1, 3), (0, 2, 3), (0, 3, 3)]
    full = engine.generate(base(batch_size=1, n_iter=3), progress_bar=False)
    np.testing.assert_array_equal(r.pixels[1], full.pixels[2])

    def stop_in_second(event):
        if event.batch_index == 1 and event.step == 2:
            raise StopGeneration

    r = engine.generate(base(batch_size=2, n_iter=3), progress=stop_in_second, progress_bar=False)
    assert r.seeds == [42, 43] and r.pixels.shape == (2, 64, 64, 3)
    r = engine.generate(base(), progress=lambda e: (_ for _ in ()).throw(StopGeneration()), progress_bar=False)
    assert r.images == [] and r.seeds == [] and r.info["interrupted"] is True


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM", "DPM++ 2M Karras"])
def test_stated_batch_bound(engine: Engine, sampler: str) -> None:
    """The README's claim, exactly: n_iter positions give the same PNG bytes as single runs; batch
    positions differ from single runs by at most one 8-bit level in at most 0.1 % of the values."""
    kw = dict(width=128, height=128, num_inference_steps=4, sampler=sampler)
    batch = engine.generate(base(**kw, batch_size=4), progress_bar=False)
    iters = engine.generate(base(**kw, n_iter=4), progress_bar=False)
    for i in range(4):
        single = engine.generate(base(**kw, seed=42 + i), progress_bar=False)
        assert png_bytes(iters.images[i]) == png_bytes(single.images[0])
        diff = np.abs(np.asarray(batch.images[i], np.int16) - np.asarray(single.images[0], np.int16))
        assert diff.max() <= 1
        assert (diff > 0).mean() <= 0.001
