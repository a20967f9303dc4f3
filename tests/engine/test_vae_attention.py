"""Tiled VAE without seams, the fp16 NaN guard, and chunked attention equal to full attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.engine.attention import ChunkedAttnProcessor
from leansd.engine.device import fp16_unsafe_gpu
from leansd.engine.vae import vae_tiling
from tests.helpers import tiny_bundle


def smooth_latents(size: int) -> torch.Tensor:
    """Smooth latents (the tiny VAE turns noise into noise, which would hide a seam)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn((1, 4, 4, 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)  # (1, 4, s, s)


def decode_both(tile: int = 128):
    vae = tiny_bundle().vae.eval()
    z = smooth_latents(32)  # 256x256 pixels: tiles of 128 px overlapping by 32 px
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
        with vae_tiling(vae, tile, scale=8):
            tiled = vae.decode(z, return_dict=False)[0]
    assert not vae.use_tiling  # our instance's settings are restored
    return whole, tiled


def test_tiled_decode_has_no_seams():
    """Jumps between neighbouring pixels where tiles meet are no larger than elsewhere in the image."""
    whole, tiled = decode_both()
    assert tiled.shape == whole.shape == (1, 3, 256, 256)
    dx = (tiled[..., :, 1:] - tiled[..., :, :-1]).abs().mean(dim=(0, 1, 2))  # (W-1,)
    dy = (tiled[..., 1:, :] - tiled[..., :-1, :]).abs().mean(dim=(0, 1, 3))  # (H-1,)
    row_limit = 128 - 32  # diffusers keeps 96 px of each tile and blends the 32 px overlap linearly
    for d in (dx, dy):
        typical = float(d.median())
        for border in (row_limit - 1, 2 * row_limit - 1):
            assert float(d[border]) < 1.5 * typical, (border, float(d[border]), typical)


def test_tiled_decode_stays_near_untiled():
    whole, tiled = decode_both()
    assert float((tiled - whole).abs().mean()) < float(whole.std())


def test_tiled_encode_is_close():
    vae = tiny_bundle().vae.eval()
    y, x = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    pixels = torch.stack([x, y, x * y])[None]  # (1, 3, 256, 256)
    with torch.no_grad():
        whole = vae.encode(pixels).latent_dist.mean
        with vae_tiling(vae, 128, scale=8):
            tiled = vae.encode(pixels).latent_dist.mean
    assert tiled.shape == whole.shape == (1, 4, 32, 32)
    assert torch.isfinite(tiled).all()
    assert float((tiled - whole).abs().mean()) < float(whole.std())  # loose: per-tile GroupNorm statistics (see issue notes)


def test_nan_guard_retries_in_fp32_and_remembers(caplog):
    engine = Engine(tiny_bundle(), device="cpu", precision="fp16", prompt_cache=False)
    calls = []

    def poison(module, inputs, output):  # NaN only in half precision, like a real fp16 VAE overflow
        calls.append(output.dtype)
        return output * float("nan") if output.dtype == torch.float16 else output

    engine.bundle.vae.decoder.register_forward_hook(poison)
    req = GenerationRequest(prompt="x", num_inference_steps=2, seed=1, width=64, height=64)
    with caplog.at_level("WARNING"):
        result = engine.generate(req, progress_bar=False)
    assert np.isfinite(result.pixels).all()
    assert calls == [torch.float16, torch.float32]
    assert sum("decoding again in fp32" in r.message for r in caplog.records) == 1
    calls.clear()
    result = engine.generate(req, progress_bar=False)  # remembered: straight to fp32, no new warning
    assert calls == [torch.float32] and np.isfinite(result.pixels).all()
    assert engine.bundle.vae.dtype == torch.float32


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_attention_equals_full(chunk):
    unet = tiny_bundle().unet.eval()
    g = torch.Generator().manual_seed(3)
    sample = torch.randn((2, 4, 16, 16), generator=g)
    context = torch.randn((2, 77, 32), generator=g)
    with torch.no_grad():
        full = unet(sample, 10, encoder_hidden_states=context).sample
        unet.set_attn_processor(ChunkedAttnProcessor(chunk))
        chunked = unet(sample, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "unsafe"), [("NVIDIA GeForce GTX 1660 SUPER", True), ("NVIDIA GeForce GTX 1650", True),
                                              ("NVIDIA GeForce RTX 3060", False), ("NVIDIA H100 80GB HBM3", False)])
def test_fp16_unsafe_gpu_names(name, unsafe):
    assert fp16_unsafe_gpu(torch.device("cuda"), name) is unsafe
    assert fp16_unsafe_gpu(torch.device("cpu"), name) is False
