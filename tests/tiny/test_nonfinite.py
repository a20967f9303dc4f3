"""NaN/inf never becomes a black image: fp32 retry where it helps (fp16 overflow), else a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.errors import NonFiniteError
from tests.helpers import tiny_bundle

REQUEST = GenerationRequest(prompt="a fox", width=64, height=64, num_inference_steps=3, sampler="DDIM", seed=9)


def _overflowing(part: str):
    """conv_in scaled so its output overflows fp16 (max 65504) while every weight still fits in fp16;
    the GroupNorm after it removes the scale, so in fp32 the image is an ordinary one."""
    bundle = tiny_bundle()
    conv = bundle.unet.conv_in if part == "unet" else bundle.vae.decoder.conv_in
    with torch.no_grad():
        conv.weight.mul_(30000 / conv.weight.abs().max())
    return bundle


def _poisoned(part: str):
    """A damaged checkpoint: one NaN bias in the UNet's or the VAE decoder's last convolution."""
    bundle = tiny_bundle()
    conv = bundle.unet.conv_out if part == "unet" else bundle.vae.decoder.conv_out
    with torch.no_grad():
        conv.bias[0] = float("nan")
    return bundle


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_fp16_overflow_is_redone_in_fp32(part: str) -> None:
    full = Engine(_overflowing(part), device="cpu", precision="full", prompt_cache=False).generate(
        REQUEST, progress_bar=False)
    engine = Engine(_overflowing(part), device="cpu", precision="fp16", prompt_cache=False)
    half = engine.generate(REQUEST, progress_bar=False)
    assert np.isfinite(half.pixels).all() and half.pixels.std() > 0.01
    # fp32 compute on fp16-rounded weights: close to the fp32 run, not a black image.
    assert np.abs(half.pixels - full.pixels).mean() < 0.02
    assert (engine.dtype == torch.float32) == (part == "unet")


@pytest.mark.parametrize("precision", ["full", "bf16", "autocast", "fp16"])
@pytest.mark.parametrize("part", ["unet", "vae"])
def test_nan_that_fp32_cannot_fix_fails_the_job(part: str, precision: str) -> None:
    engine = Engine(_poisoned(part), device="cpu", precision=precision, prompt_cache=False)
    with pytest.raises(NonFiniteError) as info:
        engine.generate(REQUEST, progress_bar=False)
    what = "latents" if part == "unet" else "decoded pixels"
    assert str(info.value).startswith(f"the model produced NaN or infinite values in the {what} (fp32)")
