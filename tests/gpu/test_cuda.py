"""CUDA checks (run on a machine with a GPU: `pytest -m gpu tests/gpu`); skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from tests.helpers import tiny_bundle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a red fox", width=64, height=64, num_inference_steps=4, sampler="Euler a", seed=3, batch_size=2)
    base.update(kw)
    return GenerationRequest(**base)


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM", "DPM++ 2M Karras", "PLMS"])
def test_cuda_fp32_matches_cpu_for_the_same_seed(sampler: str) -> None:
    """CPU-drawn noise (initial and ancestral/eta step noise) makes CUDA reproduce the CPU image."""
    req = request(sampler=sampler, eta=1.0)
    cpu = Engine(tiny_bundle(), device="cpu", precision="full").generate(req, progress_bar=False)
    gpu = Engine(tiny_bundle(), device="cuda", precision="full").generate(req, progress_bar=False)
    assert gpu.seeds == cpu.seeds
    assert np.abs(gpu.pixels - cpu.pixels).max() < 2e-3
    assert gpu.peak_memory_bytes is not None and gpu.peak_memory_bytes > 0


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE Karras"])
@pytest.mark.parametrize("precision", ["fp16", "autocast", "bf16"])
def test_cuda_half_precisions_are_finite_and_close(precision: str, sampler: str) -> None:
    req = request(sampler=sampler)
    full = Engine(tiny_bundle(), device="cuda", precision="full").generate(req, progress_bar=False)
    half = Engine(tiny_bundle(), device="cuda", precision=precision).generate(req, progress_bar=False)
    assert np.isfinite(half.pixels).all()
    assert np.abs(half.pixels - full.pixels).mean() < 0.05


def test_cuda_default_precision_is_fp16() -> None:
    engine = Engine(tiny_bundle(), device="cuda")
    assert engine.dtype == torch.float16
    assert next(engine.bundle.unet.parameters()).device.type == "cuda"
