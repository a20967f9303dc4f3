"""Tiled VAE without seams, the fp16 NaN guard, and chunked attention equal to full attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leansd import Engine, GenerationRequest
from leansd.engine.attention import ChunkedAttnProcessor
from leansd.engine.device import fp16_unsafe_gpu
from leansd.engine.tiled_vae import TiledRunner, supports, tiled_decode
from leansd.engine.vae import decode, encode, vae_tiling
from tests.helpers import tiny_bundle


def smooth_latents(size: int, batch: int = 1, width: int | None = None) -> torch.Tensor:
    """Smooth latents (the tiny VAE turns noise into noise, which would hide a seam)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn((batch, 4, 4, 4), generator=g)
    return F.interpolate(coarse, size=(size, width or size), mode="bicubic", align_corners=True)  # (B, 4, h, w)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the range of values (fp32 summation order only)."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(("tile", "height", "width", "batch"), [(64, 32, 32, 1), (128, 32, 32, 2), (96, 40, 24, 1),
                                                                 (40, 17, 29, 1), (1024, 32, 32, 1)])
def test_tiled_decode_equals_untiled(tile, height, width, batch):
    """Layer-by-layer tiles with whole-image GroupNorm statistics: no drift at any tile size or shape."""
    vae = tiny_bundle().vae.eval()
    assert supports(vae)
    z = smooth_latents(height, batch, width) + 0.3 * torch.randn((batch, 4, height, width), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
        tiled = tiled_decode(vae, z, tile)
    assert tiled.shape == whole.shape == (batch, 3, 8 * height, 8 * width)
    assert close(tiled, whole) < 2e-5


def test_tiled_decode_is_as_accurate_as_untiled():
    """Against a float64 decode, the fp32 tiles err no more than the fp32 whole-image decode: what
    remains between the two is summation order, not tiling."""
    import copy

    vae = tiny_bundle().vae.eval()
    z = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        truth = copy.deepcopy(vae).double().decode(z.double(), return_dict=False)[0]
        whole = vae.decode(z, return_dict=False)[0].double()
        tiled = tiled_decode(vae, z, 64).double()
    assert close(tiled, truth) < 2 * close(whole, truth) < 1e-5


def test_tiled_decode_has_no_seams():
    """Jumps between neighbouring pixels where tiles meet are no larger than elsewhere in the image."""
    vae = tiny_bundle().vae.eval()
    with torch.no_grad():
        tiled = tiled_decode(vae, smooth_latents(32), 64)  # 256 px: full-resolution tiles of 64 px
    dx = (tiled[..., :, 1:] - tiled[..., :, :-1]).abs().mean(dim=(0, 1, 2))  # (W-1,)
    dy = (tiled[..., 1:, :] - tiled[..., :-1, :]).abs().mean(dim=(0, 1, 3))  # (H-1,)
    for d in (dx, dy):
        typical = float(d.median())
        for border in (63, 127, 191):
            assert float(d[border]) < 1.5 * typical, (border, float(d[border]), typical)


def test_diffusers_overlapping_tiles_drift_where_ours_do_not():
    """The reason for the exact path: per-tile GroupNorm statistics shift the picture."""
    vae = tiny_bundle().vae.eval()
    z = smooth_latents(32)
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
        with vae_tiling(vae, 128, scale=8):
            theirs = vae.decode(z, return_dict=False)[0]
        ours = tiled_decode(vae, z, 128)
    assert not vae.use_tiling  # our instance's settings are restored
    assert close(theirs, whole) > 1000 * close(ours, whole)


@pytest.mark.parametrize(("tile", "height", "width"), [(64, 256, 256), (48, 200, 136), (128, 96, 160)])
def test_tiled_encode_equals_untiled(tile, height, width):
    vae = tiny_bundle().vae.eval()
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    pixels = torch.stack([x, y, x * y])[None] + 0.1 * torch.randn((1, 3, height, width), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = vae.encode(pixels).latent_dist
        tiled = encode(vae, pixels, tile, scale=8)
    assert tiled.mean.shape == whole.mean.shape == (1, 4, height // 8, width // 8)
    assert close(tiled.mean, whole.mean) < 2e-5 and close(tiled.logvar, whole.logvar) < 2e-5


def test_sd_vae_architecture_tiled_equals_untiled():
    """The real SD VAE layout (32-group GroupNorm, 512-channel mid block with attention), random weights."""
    from diffusers import AutoencoderKL

    from leansd.models.configs import SD15_VAE_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE_CONFIG).eval()
    assert supports(vae)
    z = smooth_latents(12, width=8)
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
        tiled = tiled_decode(vae, z, 32)  # 96x64 px in 32 px tiles, 16 px at the 512-channel levels
    assert close(tiled, whole) < 2e-5


def test_tile_sides_shrink_with_channels():
    runner = TiledRunner(torch.device("cpu"), torch.device("cpu"), elements=128 * 256 * 256)
    assert [runner.side(c) for c in (128, 256, 512)] == [256, 176, 128]
    assert runner.side(10**9) == 8  # never below 8 px


def test_unknown_vae_falls_back_to_diffusers_tiles():
    vae = tiny_bundle().vae.eval()
    vae.decoder.conv_out = torch.nn.Sequential(vae.decoder.conv_out)  # same maths, a layout the exact path does not know
    assert not supports(vae)
    z = smooth_latents(32)
    with torch.no_grad():
        expected = None
        with vae_tiling(vae, 128, scale=8):
            expected = vae.decode(z, return_dict=False)[0]
        got = decode(vae, z, 128, scale=8)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


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


def test_nan_guard_also_covers_the_tiled_decode(caplog):
    engine = Engine(tiny_bundle(), device="cpu", precision="fp16", prompt_cache=False)
    calls = []

    def poison(module, inputs, output):
        calls.append(output.dtype)
        return output * float("nan") if output.dtype == torch.float16 else output

    engine.bundle.vae.decoder.conv_out.register_forward_hook(poison)
    z = smooth_latents(16)
    factor = engine.bundle.vae.config.scaling_factor
    with torch.no_grad():
        # What the fp32 retry must give: fp16 weights and latents (as the first try had them) in fp32.
        expected = tiled_decode(engine.bundle.vae.half().float(), ((z * factor).half() / factor).float(), 64)
    engine.bundle.vae.half()
    engine.plan_for(width=128, height=128, batch=1)
    engine.plan = type(engine.plan)(**{**engine.plan.__dict__, "vae_tile": 64})  # as a tight budget would plan
    engine.plan_for = lambda **kw: engine.plan  # keep that plan for this decode
    calls.clear()
    with caplog.at_level("WARNING"):
        image = engine.vae_decode(z * factor)
    assert calls == [torch.float16] * 4 + [torch.float32] * 4  # 128 px in 64 px tiles, both times
    assert torch.isfinite(image).all() and any("decoding again in fp32" in r.message for r in caplog.records)
    assert close(image, expected) < 2e-5


@pytest.mark.parametrize(("tile", "height", "width"), [(64, 32, 32), (40, 17, 29), (8, 3, 5)])
def test_circular_tiled_decode_and_encode_equal_untiled(tile, height, width):
    """Seamless tiling: halos across the image edge come from the opposite edge."""
    from leansd.engine.tiling import seamless_tiling

    vae = tiny_bundle().vae.eval()
    z = torch.randn((1, 4, height, width), generator=torch.Generator().manual_seed(4))
    pixels = torch.rand((1, 3, 8 * height, 8 * width), generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad(), seamless_tiling(vae):
        assert supports(vae)
        whole = vae.decode(z, return_dict=False)[0]
        tiled = tiled_decode(vae, z, tile)
        whole_moments = vae.encode(pixels).latent_dist
        tiled_moments = encode(vae, pixels, tile, scale=8)
    assert close(tiled, whole) < 2e-5
    assert close(tiled_moments.mean, whole_moments.mean) < 2e-5
    with torch.no_grad():
        plain = vae.decode(z, return_dict=False)[0]  # padding restored: differs at the edges
    assert close(plain, whole) > 1e-3


@pytest.mark.parametrize("efficient", [True, False])
def test_mid_block_attention_across_tiles_and_query_chunks(efficient):
    """Latents spread over several tiles at the mid block, so its keys/values gather every tile;
    without efficient attention the queries also run in chunks."""
    vae = tiny_bundle().vae.eval()
    z = torch.randn((2, 4, 13, 11), generator=torch.Generator().manual_seed(6))
    runner = TiledRunner(torch.device("cpu"), torch.device("cpu"), elements=32 * 8 * 8)
    assert runner.side(32) == 8 < 11  # 8-px tiles at every level: the 13x11 latent map spans 4 tiles
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
        tiled = tiled_decode(vae, z, 8, efficient_attention=efficient)
    assert close(tiled, whole) < 2e-5


@pytest.mark.parametrize(("dtype", "size", "tile", "efficient"), [
    (torch.float16, 1024, 256, True), (torch.float32, 1024, 256, True), (torch.float16, 1024, 256, False),
    (torch.float32, 512, 64, True),
])
@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_tiled_vae_memory_stays_within_the_planner_estimate(dtype, size, tile, efficient, kind):
    """Measured device bytes of the SD VAE layout in tiles (meta device: shapes only), against the
    planner's tiled estimate without the decoded-image term."""
    import accelerate
    from diffusers import AutoencoderKL

    from leansd.engine.measure import ActivationTracker, host_store_runner
    from leansd.engine.planner import ModelSizes, PlanRequest, vae_activation
    from leansd.engine.tiled_vae import tiled_encode
    from leansd.models.configs import SD15_VAE_CONFIG

    with accelerate.init_empty_weights(include_buffers=True):
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    vae = vae.to(dtype).eval()
    d = dtype.itemsize
    sizes = ModelSizes(text_encoder=0, unet_blocks=(1,), unet_rest=0, vae=0, unet_channels=320, unet_heads=8,
                       vae_channels=128, vae_mid_channels=512, dtype_bytes=d)
    tracker = ActivationTracker(attention="efficient" if efficient else "math")
    runner = host_store_runner(tracker)
    with torch.no_grad(), tracker:
        if kind == "decode":
            tiled_decode(vae, torch.zeros((1, 4, size // 8, size // 8), dtype=dtype, device="meta"), tile,
                         efficient_attention=efficient, runner_type=runner)
        else:
            tiled_encode(vae, torch.zeros((1, 3, size, size), dtype=dtype, device="meta"), tile,
                         efficient_attention=efficient, runner_type=runner)
    request = PlanRequest(width=size, height=size, efficient_attention=efficient)
    estimate = vae_activation(sizes, request, tile=tile) - 3 * size * size * (d + 4)
    assert tracker.peak <= estimate
    assert tracker.peak >= (0.75 if efficient else 0.5) * estimate  # an estimate, not a blanket
