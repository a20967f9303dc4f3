"""Input images for img2img and inpainting: loading, validating and preparing init images and masks.

Names are imported lazily so importing `leansd.inputs` loads neither Pillow nor torch.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "RESIZE_MODES": "leansd.inputs.images",
    "MAX_PIXELS": "leansd.inputs.images",
    "MAX_SIDE": "leansd.inputs.images",
    "MIN_SIDE": "leansd.inputs.images",
    "load_image": "leansd.inputs.images",
    "load_mask": "leansd.inputs.images",
    "target_size": "leansd.inputs.images",
    "resize_mode_name": "leansd.inputs.images",
    "resize_image": "leansd.inputs.images",
    "prepare_mask": "leansd.inputs.images",
    "image_to_tensor": "leansd.inputs.images",
    "mask_to_tensor": "leansd.inputs.images",
    "validate_strength": "leansd.inputs.images",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leansd.inputs' has no attribute {name!r}")
