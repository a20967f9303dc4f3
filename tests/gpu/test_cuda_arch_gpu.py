"""The arch check on a real GPU (run with `pytest -m gpu tests/gpu`); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from leansd.engine.device import (
    UnsupportedGPUError,
    check_cuda_arch,
    cuda_arch_problem,
    resolve_device,
    translate_cuda_error,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_this_gpu_is_in_the_installed_arch_list() -> None:
    device = torch.device("cuda", 0)
    check_cuda_arch(device)  # the test machine's torch runs on its GPU
    assert resolve_device("auto") == torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    assert cuda_arch_problem(capability, torch.cuda.get_arch_list(), torch.__version__) is None
    # The same GPU against an arch list without its major version is refused, in one line.
    other = [f"sm_{major}0" for major in (5, 6, 7, 8, 9, 10, 12) if major != capability[0]]
    message = cuda_arch_problem(capability, other, torch.__version__, name=torch.cuda.get_device_name(device))
    assert message is not None and "\n" not in message
    assert message.startswith(f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.")


def test_no_kernel_image_error_names_the_gpu() -> None:
    device = torch.device("cuda", 0)
    exc = RuntimeError("CUDA error: no kernel image is available for execution on the device")
    translated = translate_cuda_error(exc, device)
    assert isinstance(translated, UnsupportedGPUError)
    assert torch.cuda.get_device_name(device) in str(translated) and "--device cpu" in str(translated)
    other = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert translate_cuda_error(other, device) is other
