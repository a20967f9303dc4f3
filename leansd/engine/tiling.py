"""Seamless tiling: the convolutions of the given models pad circularly while the context is open.

Only our own module instances change (each Conv2d's `padding_mode`), and only for the request
that asked; the previous modes are restored afterwards, also on errors. No global patching.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def seamless_tiling(*models: "torch.nn.Module") -> Iterator[None]:
    import torch

    convs = [m for model in models for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    saved = [conv.padding_mode for conv in convs]
    try:
        for conv in convs:
            conv.padding_mode = "circular"  # the image wraps around: left edge continues the right
        yield
    finally:
        for conv, mode in zip(convs, saved, strict=True):
            conv.padding_mode = mode
