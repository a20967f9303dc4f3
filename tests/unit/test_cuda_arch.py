"""The GPU / installed-torch arch check: pure functions fed fake capabilities and arch lists."""

from __future__ import annotations

import pytest
import torch

from leansd.engine.device import (
    UnsupportedGPUError,
    check_cuda_arch,
    cuda_arch_problem,
    is_missing_kernel,
    missing_kernel_error,
    translate_cuda_error,
)
from leansd.errors import LeansdError

CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
INDEX = "https://download.pytorch.org/whl"


@pytest.mark.parametrize(("capability", "arch_list"), [
    ((6, 1), CU126),  # GTX 1060 on cu126
    ((5, 2), CU126),  # GTX 970: sm_50 cubins run on 5.2
    ((8, 9), CU126),  # RTX 4090: sm_86 cubins run on 8.9
    ((7, 5), CU130),
    ((12, 0), CU130),
    ((12, 1), CU130),  # sm_120 cubins run on 12.1
    ((10, 3), ["sm_80", "sm_100f"]),  # family cubin
    ((10, 0), ["sm_80", "compute_90"]),  # PTX is compiled by the driver for newer GPUs
    ((9, 0), ["sm_80", "sm_90a"]),
    ((6, 1), []),  # an empty list (CPU build) is not judged
    ((9, 0), ["gfx90a", "gfx942"]),  # ROCm names: not judged
])
def test_supported(capability, arch_list):
    assert cuda_arch_problem(capability, arch_list, "2.13.0+cu126") is None


def test_pascal_on_a_cuda13_build():
    message = cuda_arch_problem((6, 1), CU130, "2.13.0+cu130", name="NVIDIA GeForce GTX 1060 6GB")
    assert message == (
        "NVIDIA GeForce GTX 1060 6GB (compute capability 6.1) is not supported by the installed torch 2.13.0+cu130 "
        "(kernels for sm_75 to sm_120): install the cu126 build with `make run TORCH=cu126` or "
        f'`pip install "torch==2.13.0+cu126" --index-url {INDEX}/cu126`, or run on the CPU with --device cpu'
    )
    assert "\n" not in message


def test_blackwell_on_a_cuda12_build():
    message = cuda_arch_problem((12, 0), CU126, "2.13.0+cu126", name="NVIDIA GeForce RTX 5090")
    assert message is not None
    assert message.startswith("NVIDIA GeForce RTX 5090 (compute capability 12.0) is not supported by the installed "
                              "torch 2.13.0+cu126 (kernels for sm_50 to sm_90): install the cu130 build with "
                              "`make run TORCH=cu130` (NVIDIA driver 580 or newer) or ")
    assert f'"torch==2.13.0+cu130" --index-url {INDEX}/cu130' in message


def test_turing_missing_names_both_builds():
    message = cuda_arch_problem((7, 5), ["sm_80", "sm_90"], "2.13.0+cu130")
    assert "`make run TORCH=cu130` (NVIDIA driver 580 or newer, else TORCH=cu126)" in message


def test_pascal_on_torch_2_15_points_to_2_14():
    message = cuda_arch_problem((6, 1), ["sm_75", "sm_80", "sm_90", "sm_120"], "2.15.0+cu128")
    assert f'`pip install "torch==2.14.*" --index-url {INDEX}/cu126`' in message


def test_arch_specific_and_minor_rules():
    assert cuda_arch_problem((9, 0), ["sm_80", "sm_90a"], "2.13.0") is None
    assert cuda_arch_problem((10, 0), ["sm_80", "sm_90a"], "2.13.0") is not None  # sm_90a runs on 9.0 only
    assert cuda_arch_problem((8, 0), ["sm_86"], "2.13.0") is not None  # a newer minor does not run on an older GPU
    assert cuda_arch_problem((8, 6), ["compute_89"], "2.13.0") is not None  # PTX runs on newer GPUs only


def test_kepler_has_no_build():
    message = cuda_arch_problem((3, 7), CU126, "2.13.0+cu126", name="Tesla K80")
    assert message.endswith("(kernels for sm_50 to sm_90): no current PyTorch CUDA build runs on it; "
                            "run on the CPU with --device cpu")


def test_missing_kernel_error():
    assert is_missing_kernel(RuntimeError("CUDA error: no kernel image is available for execution on the device"))
    assert not is_missing_kernel(RuntimeError("CUDA error: out of memory"))
    assert not is_missing_kernel(ValueError("no kernel image is available"))
    error = missing_kernel_error((6, 1), CU130, "2.13.0+cu130", name="GTX 1080")
    assert isinstance(error, UnsupportedGPUError) and isinstance(error, LeansdError)
    assert str(error) == cuda_arch_problem((6, 1), CU130, "2.13.0+cu130", name="GTX 1080")
    # In the arch list, yet one kernel is missing: the same advice for the GPU.
    error = missing_kernel_error((6, 1), CU126, "2.13.0+cu126", name="GTX 1080")
    assert str(error).startswith("torch 2.13.0+cu126 has no CUDA kernel for an operation on GTX 1080 "
                                 "(compute capability 6.1): install the cu126 build")


def test_cpu_device_is_never_judged():
    cpu = torch.device("cpu")
    check_cuda_arch(cpu)  # no CUDA query at all on the CPU
    exc = RuntimeError("no kernel image is available for execution on the device")
    assert translate_cuda_error(exc, cpu) is exc
