"""The "Approx cheap" preview: AUTOMATIC1111's published latent->RGB factors on a known latent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd.engine.previews import cheap_rgb, side_by_side
from leansd.models.family import ModelFamily

# AUTOMATIC1111 modules/sd_vae_approx.py cheap_approximation(), SD 1.x (rows: latent channels; R, G, B),
# copied here on their own so that the test does not read the numbers from the code it checks.
A1111_SD1 = np.array([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])
A1111_SDXL = np.array([
    [0.3448, 0.4168, 0.4395],
    [-0.1953, -0.0290, 0.0250],
    [0.1074, 0.0886, -0.0163],
    [-0.3730, -0.2499, -0.2088],
])


def _known_latent() -> torch.Tensor:
    """(1, 4, 2, 2): four pixels with chosen channel values."""
    pixels = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0], [0.5, -1.0, 2.0, 0.25], [0.0, 0.0, 0.0, 0.0]]
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, 4, 2, 2)


def test_sd1_colours_of_a_known_latent():
    rgb = cheap_rgb(_known_latent(), ModelFamily.SD1.latent_preview)  # (1, 3, 2, 2)
    got = rgb[0].permute(1, 2, 0).reshape(4, 3).numpy()
    # pixel 0: channel 0 alone -> its row; pixel 1: minus channel 3; pixel 3: zero latent -> mid grey
    assert np.allclose(got[0], A1111_SD1[0] / 2 + 0.5, atol=1e-6)
    assert np.allclose(got[1], -A1111_SD1[3] / 2 + 0.5, atol=1e-6)  # (0.592, 0.6355, 0.7365): light blue
    assert np.allclose(got[2], np.clip((np.array([0.5, -1.0, 2.0, 0.25]) @ A1111_SD1) / 2 + 0.5, 0, 1), atol=1e-6)
    assert np.allclose(got[3], [0.5, 0.5, 0.5])
    # as 8-bit: pixel 0 is (0.649, 0.6035, 0.604) -> 165, 154, 154
    image = np.asarray(side_by_side(rgb))
    assert image.shape == (2, 2, 3) and tuple(image[0, 0]) == (165, 154, 154)


def test_out_of_range_colours_are_clipped():
    latent = torch.zeros(1, 4, 1, 1)
    latent[0, 3] = -10.0  # channel 3 alone: R, G, B = 1.84, 2.71, 4.73 before the map to [0, 1]
    rgb = cheap_rgb(latent, ModelFamily.SD1.latent_preview)
    assert rgb.flatten().tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SD1_INPAINT, ModelFamily.SD2, ModelFamily.SD2_INPAINT])
def test_sd1_and_sd2_share_the_sd_factors(family):
    assert np.allclose(np.array(family.latent_preview.rgb_factors), A1111_SD1)
    assert family.latent_preview.taesd_repo == "madebyollin/taesd"


@pytest.mark.parametrize("family", [ModelFamily.SDXL, ModelFamily.SDXL_REFINER])
def test_sdxl_factors_are_ready(family):
    preview = family.latent_preview
    assert np.allclose(np.array(preview.rgb_factors), A1111_SDXL)
    assert preview.taesd_repo == "madebyollin/taesdxl"
    rgb = cheap_rgb(_known_latent(), preview)
    assert np.allclose(rgb[0, :, 0, 0].numpy(), A1111_SDXL[0] / 2 + 0.5, atol=1e-6)


def test_batch_side_by_side():
    latents = torch.zeros(3, 4, 2, 5)
    latents[1, 0] = 1.0
    image = side_by_side(cheap_rgb(latents, ModelFamily.SD1.latent_preview))
    assert image.size == (15, 2)
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == (128, 128, 128) and tuple(pixels[0, 5]) == (165, 154, 154)
    assert tuple(pixels[1, 14]) == (128, 128, 128)
