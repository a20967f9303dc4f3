"""CPU precisions: bf16 and autocast give finite images close to fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from tests.helpers import tiny_bundle


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_cpu_reduced_precision(precision: str) -> None:
    req = GenerationRequest(prompt="a red fox", width=64, height=64, num_inference_steps=3, sampler="DDIM", seed=9)
    full = Engine(tiny_bundle(), device="cpu", precision="full").generate(req, progress_bar=False)
    engine = Engine(tiny_bundle(), device="cpu", precision=precision)
    expected_weights = torch.bfloat16 if precision == "bf16" else torch.float32
    assert next(engine.bundle.unet.parameters()).dtype == expected_weights
    low = engine.generate(req, progress_bar=False)
    assert np.isfinite(low.pixels).all()
    diff = np.abs(low.pixels - full.pixels)
    assert 0 < diff.mean() < 0.05
