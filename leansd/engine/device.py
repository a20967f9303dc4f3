"""Device and precision choice. Probing happens only when these functions are called."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from leansd.errors import InvalidRequestError, LeansdError

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
            device = torch.device("cuda")
            check_cuda_arch(device)
            return device
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
        check_cuda_arch(device)
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise InvalidRequestError(f"device {name!r} requested but Apple MPS is not available here")
    elif device.type != "cpu":
        raise InvalidRequestError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


class UnsupportedGPUError(LeansdError):
    """The installed torch has no CUDA kernels for this GPU; the message says which build to install."""


# PyTorch's CUDA builds as tools/select_torch.py installs them (`make run TORCH=...`): name, the
# compute capabilities with kernels, newest first. CUDA 13 dropped Maxwell, Pascal and Volta;
# PyTorch 2.15 drops Maxwell and Pascal from every build, and CUDA 12.6 wheels end with 2.14.
CUDA_BUILDS = (("cu130", (7, 5), 12), ("cu126", (5, 0), 9))
TORCH_INDEX = "https://download.pytorch.org/whl"
_ARCH = re.compile(r"(sm|compute)_(\d+)(\d)([af]?)")


def _arch_entries(arch_list: Sequence[str]) -> list[tuple[str, tuple[int, int], str]]:
    """("sm"|"compute", (major, minor), suffix) for each entry of `torch.cuda.get_arch_list()`."""
    entries = []
    for entry in arch_list:
        match = _ARCH.fullmatch(entry.strip())
        if match:
            kind, major, minor, suffix = match.groups()
            entries.append((kind, (int(major), int(minor)), suffix))
    return entries


def _runs_on(kind: str, arch: tuple[int, int], suffix: str, capability: tuple[int, int]) -> bool:
    if kind == "compute":  # PTX: the driver compiles it for any newer GPU
        return capability >= arch
    if suffix == "a":  # arch-specific cubin (sm_90a): that GPU only
        return capability == arch
    return capability[0] == arch[0] and capability[1] >= arch[1]  # cubins run within one major version


def _gpu_fix(capability: tuple[int, int], torch_version: str) -> str:
    """What to install (or do) for a GPU of this compute capability."""
    base = torch_version.split("+")[0]
    numbers = tuple(int(p) for p in re.findall(r"\d+", base)[:2])
    builds = [build for build, oldest, newest in CUDA_BUILDS if oldest <= capability and capability[0] <= newest]
    if not builds:
        return "no current PyTorch CUDA build runs on it; run on the CPU with --device cpu"
    build = builds[0]
    if build == "cu126" and numbers >= (2, 15):
        pin = "torch==2.14.*"  # 2.15 dropped Maxwell and Pascal; CUDA 12.6 wheels end with 2.14
    else:
        pin = f"torch=={base}+{build}"
    driver = ""
    if build == "cu130":
        driver = " (NVIDIA driver 580 or newer" + (", else TORCH=cu126)" if len(builds) > 1 else ")")
    return (f"install the {build} build with `make run TORCH={build}`{driver} or "
            f"`pip install \"{pin}\" --index-url {TORCH_INDEX}/{build}`, or run on the CPU with --device cpu")


def cuda_arch_problem(
    capability: tuple[int, int], arch_list: Sequence[str], torch_version: str, *, name: str = "this GPU"
) -> str | None:
    """One line saying the GPU is not in the installed torch's arch list, and the fix; None if it is.

    Pure: `capability` is `torch.cuda.get_device_capability()`, `arch_list` is
    `torch.cuda.get_arch_list()`. An arch list without CUDA entries (CPU or ROCm builds) is not judged.
    """
    entries = _arch_entries(arch_list)
    if not entries or any(_runs_on(kind, arch, suffix, capability) for kind, arch, suffix in entries):
        return None
    archs = sorted({arch for _, arch, _ in entries})
    built = f"sm_{archs[0][0]}{archs[0][1]} to sm_{archs[-1][0]}{archs[-1][1]}"
    return (f"{name} (compute capability {capability[0]}.{capability[1]}) is not supported by the installed "
            f"torch {torch_version} (kernels for {built}): {_gpu_fix(capability, torch_version)}")


def _cuda_facts(device: "torch.device") -> tuple[tuple[int, int], list[str], str, str]:
    import torch

    return (
        tuple(torch.cuda.get_device_capability(device)),  # type: ignore[return-value]
        list(torch.cuda.get_arch_list()),
        str(torch.__version__),
        torch.cuda.get_device_name(device),
    )


def check_cuda_arch(device: "torch.device") -> None:
    """Raise UnsupportedGPUError if the installed torch has no kernels for this CUDA device."""
    import torch

    if device.type != "cuda" or torch.version.hip is not None:
        return
    capability, arch_list, version, name = _cuda_facts(device)
    problem = cuda_arch_problem(capability, arch_list, version, name=name)
    if problem is not None:
        raise UnsupportedGPUError(problem)


def is_missing_kernel(exc: BaseException) -> bool:
    """Whether `exc` is CUDA's "no kernel image is available for execution on the device"."""
    return isinstance(exc, RuntimeError) and "no kernel image is available" in str(exc)


def missing_kernel_error(
    capability: tuple[int, int], arch_list: Sequence[str], torch_version: str, *, name: str = "this GPU"
) -> UnsupportedGPUError:
    """The one-line error for a "no kernel image" failure (pure, like `cuda_arch_problem`)."""
    problem = cuda_arch_problem(capability, arch_list, torch_version, name=name)
    if problem is None:  # the GPU is in the arch list, but some kernel was not built for it
        problem = (f"torch {torch_version} has no CUDA kernel for an operation on {name} (compute capability "
                   f"{capability[0]}.{capability[1]}): {_gpu_fix(capability, torch_version)}")
    return UnsupportedGPUError(problem)


def translate_cuda_error(exc: BaseException, device: "torch.device") -> BaseException:
    """`exc`, or an UnsupportedGPUError with the fix if it is a "no kernel image" failure on `device`."""
    if device.type != "cuda" or not is_missing_kernel(exc):
        return exc
    capability, arch_list, version, name = _cuda_facts(device)
    return missing_kernel_error(capability, arch_list, version, name=name)


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
