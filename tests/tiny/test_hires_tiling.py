"""The hires second pass and seamless tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from leansd import Engine, GenerationRequest
from leansd.engine.tiling import seamless_tiling
from leansd.errors import InvalidRequestError
from tests.helpers import tiny_bundle


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_bundle(), device="cpu", precision="full")


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a castle on a hill", width=64, height=64, num_inference_steps=4, sampler="Euler a", seed=5)
    base.update(kw)
    return GenerationRequest(**base)


def test_lanczos_hires_is_img2img_of_the_upscaled_first_pass(engine: Engine) -> None:
    hires = engine.generate(request(hires_scale=1.5, hires_strength=0.6, hires_steps=5), progress_bar=False)
    assert hires.images[0].size == (96, 96)
    first = engine.generate(request(), progress_bar=False).images[0]
    upscaled = first.resize((96, 96), Image.LANCZOS)
    refined = engine.generate(
        request(init_image=upscaled, strength=0.6, num_inference_steps=5, width=None, height=None),
        progress_bar=False,
    )
    np.testing.assert_allclose(hires.pixels, refined.pixels, atol=1e-5)
    info = hires.infotexts[0]
    assert "Size: 64x64" in info and "Hires upscale: 1.5" in info and "Hires steps: 5" in info
    assert "Hires upscaler: Lanczos" in info and "Denoising strength: 0.6" in info


def test_latent_hires(engine: Engine) -> None:
    out = engine.generate(request(hires_width=128, hires_upscaler="latent", batch_size=2), progress_bar=False)
    assert [im.size for im in out.images] == [(128, 128), (128, 128)]
    assert np.isfinite(out.pixels).all() and out.pixels.std() > 0.05
    assert "Hires resize: 128x128" in out.infotexts[0] and "Hires upscaler: Latent" in out.infotexts[0]
    single = engine.generate(request(hires_width=128, hires_upscaler="latent", seed=6), progress_bar=False)
    np.testing.assert_allclose(out.pixels[1], single.pixels[0], atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hires_scale": 1.5, "hires_width": 128}, "either hires_scale or hires width/height"),
        ({"hires_scale": 9.0}, "hires_scale must be between 1 and 4"),
        ({"hires_width": 100}, "hires_width must be a multiple of 8"),
        ({"hires_scale": 2.0, "init_image": Image.new("RGB", (64, 64))}, "for txt2img only"),
        ({"hires_scale": 2.0, "hires_upscaler": "esrgan"}, "unknown hires_upscaler 'esrgan'; valid: lanczos, latent"),
        ({"hires_scale": 2.0, "hires_strength": 1.5}, "hires_strength must be between 0 and 1"),
    ],
)
def test_hires_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
        request(**changes).validated()


def test_circular_padding_makes_the_models_shift_equivariant(engine: Engine) -> None:
    """On a torus every layer commutes with shifts: the model cannot tell where the edge is."""
    unet, vae = engine.bundle.unet, engine.bundle.vae
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])

    def unet_out(latents):
        return unet(latents, t, encoder_hidden_states=context).sample

    with torch.inference_mode():
        with seamless_tiling(unet, vae):
            shifted_in = unet_out(torch.roll(x, shifts=(2, 4), dims=(2, 3)))
            shifted_out = torch.roll(unet_out(x), shifts=(2, 4), dims=(2, 3))
            decoded_shift = vae.decode(torch.roll(x, shifts=1, dims=3)).sample
            shifted_decode = torch.roll(vae.decode(x).sample, shifts=8, dims=3)
        plain_in = unet_out(torch.roll(x, shifts=(2, 4), dims=(2, 3)))
        plain_out = torch.roll(unet_out(x), shifts=(2, 4), dims=(2, 3))
    torch.testing.assert_close(shifted_in, shifted_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoded_shift, shifted_decode, atol=1e-4, rtol=1e-4)
    assert (plain_in - plain_out).abs().max() > 1e-2  # zero padding: the edges show


def edge_ratio(pixels: np.ndarray) -> float:
    """Mean jump across the wrap-around seam (right->left, bottom->top) over mean jump between neighbours."""
    p = pixels.astype(np.float64)
    seam = (np.abs(p[:, 0] - p[:, -1]).mean() + np.abs(p[0, :] - p[-1, :]).mean()) / 2
    interior = (np.abs(np.diff(p, axis=1)).mean() + np.abs(np.diff(p, axis=0)).mean()) / 2
    return seam / interior


def test_tiled_images_continue_across_their_edges(engine: Engine) -> None:
    tiled = engine.generate(request(tiling=True, batch_size=4, num_inference_steps=6), progress_bar=False)
    plain = engine.generate(request(batch_size=4, num_inference_steps=6), progress_bar=False)
    tiled_ratios = [edge_ratio(p) for p in tiled.pixels]
    plain_ratios = [edge_ratio(p) for p in plain.pixels]
    # Across the seam a tiled image changes no more than between neighbouring pixels inside it
    # (ratio ~0.9 here); an untiled one jumps (ratio ~1.24 even for these noise-like images).
    assert max(tiled_ratios) < 1.15
    assert np.mean(plain_ratios) > 1.25 * np.mean(tiled_ratios)
    assert "Tiling: True" in tiled.infotexts[0]


def test_tiling_is_restored_after_the_request(engine: Engine) -> None:
    before = engine.generate(request(), progress_bar=False).pixels
    engine.generate(request(tiling=True), progress_bar=False)
    modes = {m.padding_mode for m in engine.bundle.unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert modes == {"zeros"}
    np.testing.assert_array_equal(engine.generate(request(), progress_bar=False).pixels, before)
