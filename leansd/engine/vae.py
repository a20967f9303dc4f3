"""VAE tiling (diffusers' own tiled encode/decode, configured per call on our instance) and the
fp16 NaN guard."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

TILE_OVERLAP = 0.25
"""Share of a tile that overlaps its neighbour; the overlap is blended linearly (no seams)."""


@contextlib.contextmanager
def vae_tiling(vae: "AutoencoderKL", tile: int | None, *, scale: int) -> Iterator[None]:
    """While open, `vae.encode`/`vae.decode` work in `tile`-pixel tiles (None: whole images).

    Uses diffusers' tiled encode/decode (overlapping tiles, linear blend over the overlap) on this
    instance only; the previous settings come back afterwards, also on errors.
    """
    if tile is None:
        yield
        return
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    saved = {name: getattr(vae, name) for name in names}
    try:
        vae.use_tiling = True
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // scale
        vae.tile_overlap_factor = TILE_OVERLAP
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


def is_finite(tensor: "torch.Tensor") -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())
