"""leansd: Stable Diffusion on the hardware people own.

    from leansd import Engine, GenerationRequest
    engine = Engine.load("model.safetensors")
    result = engine.generate(GenerationRequest(prompt="a red fox", seed=1))
    result.images[0].save("fox.png")

Names are imported lazily so `import leansd` (and `leansd --help`) stays instant.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "GenerationRequest", "GenerationResult", "LeansdError"]

_LAZY = {
    "Engine": "leansd.engine.engine",
    "GenerationRequest": "leansd.request",
    "GenerationResult": "leansd.request",
    "LeansdError": "leansd.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leansd' has no attribute {name!r}")
