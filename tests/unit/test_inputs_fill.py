"""A1111's "fill" start for inpainting: known pixels untouched, the hole takes nearby colours."""

from __future__ import annotations

import numpy as np
from PIL import Image

from leansd.inputs.fill import fill_masked_area


def test_fill_keeps_known_pixels_and_bleeds_colours_inward() -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (200, 30, 30)  # red left half
    rgb[:, 32:] = (30, 30, 200)  # blue right half
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out = np.asarray(fill_masked_area(Image.fromarray(rgb), Image.fromarray(mask))).astype(int)
    known = mask == 0
    assert np.array_equal(out[known], rgb[known])
    # Inside the hole: reddish near the red side, bluish near the blue side, no black left.
    assert out[32, 17, 0] > out[32, 17, 2]
    assert out[32, 46, 2] > out[32, 46, 0]
    assert out[16:48, 16:48].sum(axis=-1).min() > 150


def test_fill_without_hole_is_identity() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    out = fill_masked_area(Image.fromarray(rgb), Image.new("L", (16, 16), 0))
    assert np.array_equal(np.asarray(out), rgb)
