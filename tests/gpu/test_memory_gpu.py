"""Memory budgets on a real GPU: measured peak under the budget, same pictures (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def bundle():
    from bench.common import build_sd15_components, sd15_bundle

    return sd15_bundle(build_sd15_components(dtype=torch.float16))


def generate(bundle, *, size: int, vram, steps: int = 3, **memory):
    from leansd import Engine, GenerationRequest

    engine = Engine(bundle, device="cuda", precision="fp16", prompt_cache=False, vram=vram, **memory)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = engine.generate(GenerationRequest(prompt="a lighthouse", num_inference_steps=steps, seed=3,
                                               width=size, height=size), progress_bar=False)
    peak = torch.cuda.max_memory_allocated()
    for name in ("text", "unet", "vae"):
        engine._evict(name)  # hand the shared bundle back on the host for the next engine
    return result, peak


@pytest.mark.parametrize("vram", ["4G", "2G", "1.5G", "1G"])
def test_peak_under_budget_at_512_and_same_picture(bundle, vram):
    from leansd.engine.planner import parse_size

    reference, _ = generate(bundle, size=512, vram=None)
    result, peak = generate(bundle, size=512, vram=vram)
    assert peak <= parse_size(vram), (peak, result.memory_plan)
    np.testing.assert_allclose(result.pixels, reference.pixels, atol=2e-2)  # fp16 kernels differ by batch shape


def test_peak_under_budget_at_a_large_size(bundle):
    result, peak = generate(bundle, size=1536, vram="3G", steps=2)
    assert peak <= 3 * 2**30, (peak, result.memory_plan)
    assert np.isfinite(result.pixels).all()


def test_auto_budget_follows_free_memory(bundle):
    """--vram auto is read again before each plan: memory another process takes shrinks the budget,
    and it comes back when that process ends."""
    import subprocess
    import sys

    from leansd import Engine

    if torch.cuda.mem_get_info()[0] < 4 * 2**30:
        pytest.skip("needs 4 GiB free for a second process holding 2 GiB")
    engine = Engine(bundle, device="cuda", precision="fp16", prompt_cache=False, vram="auto")
    engine.plan_for(width=512, height=512)
    before = engine.budget
    hog = subprocess.Popen(
        [sys.executable, "-c", "import torch, time; x = torch.empty(2 << 30, dtype=torch.uint8, device='cuda'); "
         "print('holding', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert hog.stdout.readline().strip() == "holding"
        engine.plan_for(width=512, height=512)
        assert before - engine.budget >= 2 * 2**30  # its 2 GiB plus its CUDA context
    finally:
        hog.kill()
        hog.wait()
    engine.plan_for(width=512, height=512)
    assert abs(engine.budget - before) < 64 * 2**20
    for name in ("text", "unet", "vae"):
        engine._evict(name)


def test_tiled_vae_on_cuda_matches_whole_and_stays_within_its_estimate(bundle):
    """Exact tiles on the GPU (maps in host RAM): same image as the whole decode, and the measured
    peak above the weights within the planner's estimate for that tile."""
    from leansd.engine.memory import model_sizes
    from leansd.engine.planner import PlanRequest, vae_activation
    from leansd.engine.tiled_vae import tiled_decode
    from leansd.engine.vae import store_for

    vae = bundle.vae.to(device="cuda", dtype=torch.float16)
    try:
        g = torch.Generator().manual_seed(0)
        z = torch.nn.functional.interpolate(torch.randn((1, 4, 8, 8), generator=g), size=(128, 128), mode="bicubic")
        z = z.to(device="cuda", dtype=torch.float16)  # a 1024x1024 image
        weights = torch.cuda.memory_allocated()
        with torch.inference_mode():
            torch.cuda.reset_peak_memory_stats()
            whole = vae.decode(z, return_dict=False)[0]
            whole_peak = torch.cuda.max_memory_allocated() - weights
            del whole
            whole = vae.decode(z, return_dict=False)[0].float().cpu()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            tiled = tiled_decode(vae, z, 256, store=store_for(z.device)).to("cuda")
            tiled_peak = torch.cuda.max_memory_allocated() - base
        sizes = model_sizes(bundle, dtype_bytes=2)
        estimate = vae_activation(sizes, PlanRequest(width=1024, height=1024, efficient_attention=True), tile=256)
        assert tiled_peak <= estimate, (tiled_peak, estimate)
        assert tiled_peak < whole_peak / 3, (tiled_peak, whole_peak)
        assert float((tiled.float().cpu() - whole).abs().max()) < 2e-2  # fp16 summation order
    finally:
        vae.to(device="cpu", dtype=torch.float16)
        torch.cuda.empty_cache()
