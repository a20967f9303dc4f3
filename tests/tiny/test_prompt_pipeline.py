"""The prompt language and the embedding cache inside whole generations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leansd import Engine, GenerationRequest
from leansd.prompts.cache import PromptCache
from tests.helpers import tiny_bundle


def request(prompt: str, **kw) -> GenerationRequest:
    base = dict(prompt=prompt, negative_prompt="blurry", width=64, height=64, num_inference_steps=4,
                sampler="DDIM", seed=8)
    base.update(kw)
    return GenerationRequest(**base)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False)


def pixels(engine: Engine, prompt: str, **kw) -> np.ndarray:
    return engine.generate(request(prompt, **kw), progress_bar=False).pixels


def test_emphasis_changes_the_picture_and_plain_syntax_ignores_it(engine: Engine) -> None:
    plain = pixels(engine, "a red fox")
    assert np.abs(pixels(engine, "a (red:1.5) fox") - plain).max() > 1e-3
    # With the plain syntax, brackets are just characters: not the same as the emphasised prompt.
    assert np.abs(pixels(engine, "a (red:1.5) fox", prompt_syntax="plain")
                  - pixels(engine, "a (red:1.5) fox")).max() > 1e-3


def test_and_with_zero_weight_equals_the_single_prompt(engine: Engine) -> None:
    np.testing.assert_allclose(pixels(engine, "a red fox AND a blue whale :0"), pixels(engine, "a red fox"),
                               atol=1e-4)
    assert np.abs(pixels(engine, "a red fox AND a blue whale") - pixels(engine, "a red fox")).max() > 1e-3


def test_prompt_editing_switches_during_sampling(engine: Engine) -> None:
    fox, whale = pixels(engine, "a red fox"), pixels(engine, "a blue whale")
    np.testing.assert_array_equal(pixels(engine, "[a red fox:a blue whale:0]"), whale)  # switch at once
    np.testing.assert_array_equal(pixels(engine, "[a red fox:a blue whale:1000]"), fox)  # never switch
    # As A1111: 0.25 of 4 steps -> switch point 1: the fox for loop steps 0 and 1, the whale for 2 and 3.
    half = pixels(engine, "[a red fox:a blue whale:0.25]")
    np.testing.assert_array_equal(half, pixels(engine, "[a red fox:a blue whale:1]"))
    assert np.abs(half - fox).max() > 1e-3 and np.abs(half - whale).max() > 1e-3


def test_blocks_syntax_weights_the_blocks(engine: Engine) -> None:
    mixed = pixels(engine, "tabby cat:0.25 white duck:0.75")
    assert np.abs(mixed - pixels(engine, "tabby cat white duck")).max() > 1e-3
    # Normalised weights: the same mix in another order and scale (float sums differ in the last bits).
    np.testing.assert_allclose(mixed, pixels(engine, "white duck:3 tabby cat:1"), atol=1e-5)


def test_long_prompts_use_more_chunks(engine: Engine) -> None:
    words = " ".join(["red fox"] * 45)  # 90 tokens: more than one 75-token window
    result = engine.generate(request(words), progress_bar=False)
    assert result.info["prompt_chunks"] == 2
    truncated = engine.generate(request(" ".join(["red fox"] * 20)), progress_bar=False)
    assert truncated.info["prompt_chunks"] == 1
    assert np.abs(result.pixels - truncated.pixels).max() > 1e-3


def test_full_cache_hit_never_touches_the_text_encoder(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=PromptCache(cache_dir))
    miss = first.generate(request("a (red:1.2) fox AND a cat"), progress_bar=False)
    assert miss.info["text_encoder_used"] is True

    bundle = tiny_bundle()
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the text encoder must not be used on a cache hit")

    bundle.text_encoder.forward = forbidden
    bundle.text_encoder.to = forbidden
    second = Engine(bundle, device="cpu", precision="full", prompt_cache=PromptCache(cache_dir))
    hit = second.generate(request("a (red:1.2) fox AND a cat"), progress_bar=False)
    assert calls == []
    assert hit.info["text_encoder_used"] is False
    np.testing.assert_array_equal(hit.pixels, miss.pixels)


def test_cache_is_bypassed_when_disabled(tmp_path: Path, engine: Engine) -> None:
    result = engine.generate(request("a red fox"), progress_bar=False)
    assert result.info["prompt_cache"] == "off" and result.info["text_encoder_used"] is True


def test_bad_prompt_syntax_name() -> None:
    from leansd.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="unknown prompt_syntax 'fancy'; valid: auto, a1111, blocks, plain"):
        request("x", prompt_syntax="fancy").validated()
