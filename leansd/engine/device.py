"""Device and precision choice. Probing happens only when these functions are called."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from leansd.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "full", "autocast", "fp16", "bf16")
_PRECISION_ALIASES = {"fp32": "full", "float32": "full", "half": "fp16", "float16": "fp16", "bfloat16": "bf16"}


def resolve_device(name: str | None = "auto") -> "torch.device":
    """"auto" picks CUDA, then Apple MPS, then the CPU; an explicit device must exist."""
    import torch

    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError(
                f"device {name!r} requested but CUDA is not available here (torch {torch.__version__}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidRequestError(
                f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise InvalidRequestError(f"device {name!r} requested but Apple MPS is not available here")
    elif device.type != "cpu":
        raise InvalidRequestError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


@dataclass(frozen=True)
class Precision:
    name: str
    """Canonical precision name (one of PRECISIONS, never "auto")."""
    weight_dtype: "torch.dtype"
    """dtype of the weights on the compute device."""
    autocast_dtype: "torch.dtype | None"
    """If set, run the models under torch.autocast with this dtype."""


FP16_UNSAFE_GPUS = ("GTX 16", "MX450", "MX550")
"""GPU names (substrings) known for black/green images in fp16 (Turing without tensor cores)."""


def fp16_unsafe_gpu(device: "torch.device", name: str | None = None) -> bool:
    """Whether `device` is a GPU that makes NaN/black images in half precision: default to full there."""
    import torch

    if device.type != "cuda":
        return False
    if name is None:
        name = torch.cuda.get_device_name(device)
    if any(bad in name.upper() for bad in FP16_UNSAFE_GPUS):
        logger.warning("%s is known to produce black/green images in fp16: using full precision", name)
        return True
    return False


def resolve_precision(name: str, device: "torch.device") -> Precision:
    """Map a user precision to dtypes. Defaults: fp32 on CPU (fp16 is emulated there), fp16 on GPUs."""
    import torch

    key = _PRECISION_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in PRECISIONS:
        raise InvalidRequestError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
    if key == "auto":
        key = "full" if device.type == "cpu" or fp16_unsafe_gpu(device) else "fp16"
    if key == "full":
        return Precision("full", torch.float32, None)
    if key == "fp16":
        return Precision("fp16", torch.float16, None)
    if key == "bf16":
        return Precision("bf16", torch.bfloat16, None)
    # autocast: the CompVis scripts' mixed precision. On the CPU, bf16 is the fast autocast type.
    if device.type == "cpu":
        return Precision("autocast", torch.float32, torch.bfloat16)
    return Precision("autocast", torch.float16, torch.float16)
