"""A1111's "fill" inpainting start: the masked area painted with blurred surrounding colours."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def fill_masked_area(image: "Image.Image", mask: "Image.Image") -> "Image.Image":
    """Replace pixels where `mask` >= 128 by progressively less blurred copies of the known pixels.

    Starts from the mean colour of the known area, then repeatedly blurs (large radius first) and
    pastes the known pixels back, so colours bleed inward from the mask's border.
    """
    import numpy as np
    from PIL import Image as PILImage, ImageFilter

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    hole = np.asarray(mask.convert("L")) >= 128  # (H, W) True where regenerated
    if not hole.any():
        return image.convert("RGB")
    known = ~hole
    current = rgb.copy()
    current[hole] = rgb[known].mean(axis=0) if known.any() else 127.5
    for radius in (64, 16, 4, 2, 1):
        blurred = PILImage.fromarray(current.round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
        current = np.asarray(blurred, dtype=np.float32).copy()
        current[known] = rgb[known]  # known pixels stay exactly the original
    return PILImage.fromarray(current.round().astype(np.uint8))
