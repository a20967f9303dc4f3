"""Compute backends: what runs the model parts (text encoders, UNet, VAE encoder and decoder).

The engine decides where weights live and plans memory; a backend only runs the parts. The
pipelines, prompts, sampling loop and front ends call the engine and never know which backend
runs: `torch` (eager PyTorch, every device) or `openvino` (OpenVINO's CPU runtime, the fast CPU
path; `pip install leansd[openvino]`). See docs/OPENVINO.md.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from leansd.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "torch", "openvino")
DEFAULT_BACKEND = "auto"
BACKEND_HELP = (
    "compute backend: torch, openvino (CPU only; pip install leansd[openvino]) or auto (default: OpenVINO on a "
    "CPU where it is installed and this model was converted before, or --convert allows converting; else torch)"
)
CONVERT_HELP = (
    "allow --backend auto to convert the model to OpenVINO now (once per model and image size, cached; "
    "minutes for a full-size model)"
)
INSTALL_HINT = "pip install leansd[openvino]"


def openvino_installed() -> bool:
    """Whether the `openvino` package can be imported (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def check_backend_name(name: str) -> str:
    """`name` lower-cased, or InvalidRequestError naming the valid backends."""
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    return key


def check_openvino_usable(device: "torch.device", *, precision: str, budget: int | None, memory_policy: str) -> None:
    """Raise InvalidRequestError (one line) when `--backend openvino` cannot run with these settings."""
    if device.type != "cpu":
        raise InvalidRequestError(
            f"the openvino backend runs on the CPU only; this engine runs on {device.type} "
            "(use --backend torch, or --device cpu)"
        )
    if not openvino_installed():
        raise InvalidRequestError(f"the openvino backend needs the openvino package: {INSTALL_HINT}")
    if precision != "full":
        raise InvalidRequestError(
            f"the openvino backend computes in fp32; precision {precision!r} is not available with it (use --precision full)"
        )
    if budget is not None or memory_policy != "auto":
        raise InvalidRequestError(
            "the openvino backend runs the whole model in RAM; a memory budget or memory policy does not apply to it"
        )
