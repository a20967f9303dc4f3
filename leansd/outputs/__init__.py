"""Image outputs: A1111 infotext metadata, atomic PNG/JPEG writing, file naming, grids.

Names are imported lazily so importing `leansd.outputs.infotext` does not load Pillow.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "build_infotext": "leansd.outputs.infotext",
    "parse_infotext": "leansd.outputs.infotext",
    "ImageWriter": "leansd.outputs.writer",
    "check_outdir": "leansd.outputs.writer",
    "count_grids": "leansd.outputs.writer",
    "count_images": "leansd.outputs.writer",
    "grid_filename": "leansd.outputs.writer",
    "image_filename": "leansd.outputs.writer",
    "make_grid": "leansd.outputs.writer",
    "read_infotext": "leansd.outputs.writer",
    "save_image": "leansd.outputs.writer",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leansd.outputs' has no attribute {name!r}")
