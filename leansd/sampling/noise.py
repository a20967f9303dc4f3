"""Initial latent noise: the reproducibility contract.

Image i starts from `torch.randn((1, C, H/f, W/f), generator=torch.Generator("cpu").manual_seed(seed_i))`
in float32, drawn on the CPU and only then moved to the compute device, so a seed gives the same
picture on CPU and GPU and in any batch position. The same per-image generator then feeds the
ancestral samplers' step noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def image_generators(seeds: list[int]) -> list["torch.Generator"]:
    """One CPU generator per image, seeded with that image's seed."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def initial_noise(
    generators: list["torch.Generator"], *, channels: int, height: int, width: int
) -> "torch.Tensor":
    """Draw each image's starting noise from its own generator; returns (B, C, h, w) float32 on CPU."""
    import torch

    return torch.cat(
        [torch.randn((1, channels, height, width), generator=g, dtype=torch.float32) for g in generators]
    )
