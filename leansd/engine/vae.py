"""VAE decode/encode as the memory plan says (whole, or in tiles) and the fp16 NaN guard.

Tiles use the exact layer-by-layer path (`leansd.engine.tiled_vae`) whenever the VAE is built from
the blocks it knows; other VAEs fall back to diffusers' overlapping tiles (blended, but each tile
normalised on its own).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

TILE_OVERLAP = 0.25
"""diffusers' fallback tiling: share of a tile that overlaps its neighbour (blended linearly)."""


@contextlib.contextmanager
def vae_tiling(vae: "AutoencoderKL", tile: int | None, *, scale: int) -> Iterator[None]:
    """While open, `vae.encode`/`vae.decode` use diffusers' tiles of `tile` pixels (None: whole).

    The fallback for VAEs the exact path does not support; configured on this instance only, and
    the previous settings come back afterwards, also on errors.
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


def store_for(device: "torch.device") -> "torch.device":
    """Where tiled layer maps wait between layers: host RAM for a GPU (the point of tiling is to keep
    the device to one tile), the device itself otherwise."""
    import torch

    return torch.device("cpu") if device.type != "cpu" else device


def decode(vae: "AutoencoderKL", z: "torch.Tensor", tile: int | None, *, scale: int,
           efficient_attention: bool | None = None) -> "torch.Tensor":
    """Unscaled latents (B, C, h, w) -> decoded images (B, 3, H, W) at the VAE's dtype, on z's device.

    `efficient_attention`: as the plan assumed (None: detect from the device)."""
    from leansd.engine.tiled_vae import supports, tiled_decode

    if tile is not None and supports(vae):
        return tiled_decode(vae, z, tile, store=store_for(z.device), efficient_attention=efficient_attention).to(z.device)
    with vae_tiling(vae, tile, scale=scale):
        return vae.decode(z, return_dict=False)[0]


def encode(vae: "AutoencoderKL", pixels: "torch.Tensor", tile: int | None, *, scale: int,
           efficient_attention: bool | None = None) -> Any:
    """Images (B, 3, H, W) in [-1, 1] -> the VAE's latent distribution (on the pixels' device)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from leansd.engine.tiled_vae import supports, tiled_encode

    if tile is not None and supports(vae):
        moments = tiled_encode(vae, pixels, tile, store=store_for(pixels.device), efficient_attention=efficient_attention)
        return DiagonalGaussianDistribution(moments.to(pixels.device))
    with vae_tiling(vae, tile, scale=scale):
        return vae.encode(pixels).latent_dist


def is_finite(tensor: "torch.Tensor") -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())
