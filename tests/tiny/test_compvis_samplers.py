"""DDIM and PLMS equal an independent re-implementation of the original CompVis samplers.

The reference below follows the maths of CompVis `ldm/models/diffusion/ddim.py` and `plms.py`
(uniform timesteps `range(0, 1000, 1000 // S) + 1`, alphas_prev starting at alphas_cumprod[0]),
written from the equations, on the same tiny weights, noise and guidance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.pipelines.steps import decode_latents, encode_conditioning
from leansd.sampling.noise import image_generators, initial_noise
from tests.helpers import tiny_bundle

STEPS = 5
SCALE = 7.5


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_bundle(), device="cpu", precision="full")


def schedule(engine: Engine):
    cfg = engine.bundle.scheduler_config
    # scaled_linear: betas are a linspace in sqrt space.
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    timesteps = np.arange(0, 1000, 1000 // STEPS) + 1  # CompVis make_ddim_timesteps("uniform")
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    return timesteps, alphas.float(), alphas_prev.float()


def compvis_run(engine: Engine, request: GenerationRequest, method: str) -> np.ndarray:
    request = request.validated()
    unet = engine.bundle.unet
    step = encode_conditioning(engine, request, steps=STEPS).plan(STEPS).at(0)
    cond, uncond = step.conds[0], step.uncond
    generators = image_generators(request.image_seeds())
    x = initial_noise(generators, channels=4, height=8, width=8)
    timesteps, alphas, alphas_prev = schedule(engine)

    def eps(x, t):
        with torch.inference_mode():
            out = unet(torch.cat([x, x]), torch.tensor([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
        e_u, e_c = out.chunk(2)
        return e_u + SCALE * (e_c - e_u)

    def x_prev_from(x, e_t, index, eta=0.0, noise=None):
        a_t, a_prev = alphas[index], alphas_prev[index]
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        dir_xt = (1 - a_prev - sigma**2).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        return x_prev if noise is None else x_prev + sigma * noise

    time_range = list(reversed(timesteps))
    old_eps: list[torch.Tensor] = []
    for i, t in enumerate(time_range):
        index = STEPS - i - 1
        e_t = eps(x, int(t))
        if method == "ddim":
            x = x_prev_from(x, e_t, index)
            continue
        # PLMS (Liu et al. 2022, pseudo linear multi-step), CompVis variant.
        if not old_eps:
            x_tmp = x_prev_from(x, e_t, index)
            t_next = time_range[min(i + 1, len(time_range) - 1)]
            e_prime = (e_t + eps(x_tmp, int(t_next))) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_from(x, e_prime, index)
        old_eps.append(e_t)
    return decode_latents(engine, x)


@pytest.mark.parametrize("method", ["ddim", "plms"])
def test_matches_compvis(engine: Engine, method: str) -> None:
    request = GenerationRequest(
        prompt="a red fox", negative_prompt="blurry", width=64, height=64,
        num_inference_steps=STEPS, guidance_scale=SCALE, sampler=method, seed=11,
    )
    ours = engine.generate(request, progress_bar=False).pixels
    ref = compvis_run(engine, request, method)
    assert np.abs(ours - ref).max() < 1e-4
    assert ref.std() > 0.05
