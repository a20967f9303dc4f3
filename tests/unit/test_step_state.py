"""x0 of every sampler (leansd.sampling.loop.X0Estimator) against the schedulers' own estimates."""

from __future__ import annotations

import pytest
import torch

from leansd.models.configs import SD1_SCHEDULER_CONFIG
from leansd.sampling.loop import X0Estimator, sigma_space, step_kwargs
from leansd.sampling.samplers import build_scheduler, sampler_names

# Schedulers whose step returns their own x0 (pred_original_sample, or LCM's `denoised`).
RETURNS_X0 = {"DDIM", "Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ SDE Karras", "LCM"}


def _run(name: str, prediction_type: str, steps: int = 6, keep_model_outputs: bool = False):
    """A scheduler run on synthetic model outputs; yields (x0 from the estimator, scheduler output)."""
    torch.manual_seed(0)
    scheduler = build_scheduler(name, dict(SD1_SCHEDULER_CONFIG, prediction_type=prediction_type), seeds=[1])
    scheduler.set_timesteps(steps)
    generators = [torch.Generator().manual_seed(1)]
    x = torch.randn(1, 4, 8, 8) * scheduler.init_noise_sigma
    estimate = X0Estimator(scheduler)
    rows = []
    for t in scheduler.timesteps:
        x_hat = scheduler.scale_model_input(x, t)
        output = torch.randn(1, 4, 8, 8) * 0.5 + 0.3 * x_hat
        estimate.before_step(t, x)
        result = scheduler.step(output, t, x, **step_kwargs(scheduler, eta=0.0, generators=generators))
        estimate.after_step(t)
        row = (estimate.at(x_hat)(output), result, x, output)
        if keep_model_outputs:
            row += (scheduler.model_outputs[-1].clone(),)
        rows.append(row)
        x = result.prev_sample
    return scheduler, rows


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", sorted(RETURNS_X0))
def test_x0_equals_the_schedulers_own(name, prediction_type):
    _, rows = _run(name, prediction_type)
    for x0, result, _, _ in rows:
        own = getattr(result, "pred_original_sample", None)
        if own is None:
            own = result.denoised  # LCM: c_skip * x + c_out * x0, c_skip ~ 0 past its first step
        tol = 2e-4 if name == "LCM" else 1e-5
        assert torch.allclose(x0, own, rtol=tol, atol=tol * float(own.abs().max())), name


LAST_STEP_TO_ZERO = ["Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M Karras",
                     "DPM++ SDE Karras", "UniPC", "LCM"]


@pytest.mark.parametrize("name", LAST_STEP_TO_ZERO)
def test_last_x0_is_the_final_latent(name):
    """Samplers whose last step lands on sigma 0 (single-step, or multistep solvers that end first-order)."""
    _, rows = _run(name, "epsilon")
    x0, result, _, _ = rows[-1]
    assert torch.allclose(x0, result.prev_sample, atol=1e-5 * float(x0.abs().max()))


def test_ddim_last_step_is_x0_renoised_to_the_final_alpha():
    """DDIM (eta 0) ends at alphas_cumprod[0] (set_alpha_to_one=False): x = sqrt(a) x0 + sqrt(1-a) eps."""
    scheduler, rows = _run("DDIM", "epsilon")
    x0, result, _, output = rows[-1]
    a = scheduler.final_alpha_cumprod
    expected = a.sqrt() * x0 + (1 - a).sqrt() * output
    assert torch.allclose(result.prev_sample, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["DPM++ 2M", "DPM++ 2M Karras", "UniPC"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_x0_equals_its_converted_model_output(name, prediction_type):
    """DPM-Solver++ and UniPC keep the x0 they step with in `model_outputs` (they do not return it)."""
    _, rows = _run(name, prediction_type, keep_model_outputs=True)
    for x0, _, _, _, kept in rows:
        assert torch.allclose(x0, kept, atol=1e-5 * float(kept.abs().max()))


def test_plms_x0_recovers_a_known_clean_latent():
    """PLMS returns no x0: build x_t from a known x0 and eps; the estimate from eps must give x0 back."""
    scheduler = build_scheduler("PLMS", SD1_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    torch.manual_seed(3)
    clean, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    estimate = X0Estimator(scheduler)
    for t in scheduler.timesteps[:4]:
        abar = scheduler.alphas_cumprod[int(t)]
        x = abar.sqrt() * clean + (1 - abar).sqrt() * eps  # DDPM forward process
        estimate.before_step(t, x)
        scheduler.step(eps, t, x)
        estimate.after_step(t)
        assert torch.allclose(estimate.at(x)(eps), clean, atol=1e-5)


def test_sigma_space_detection():
    assert all(
        sigma_space(build_scheduler(n, SD1_SCHEDULER_CONFIG)) is (n in {"Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ SDE Karras"})
        for n in sampler_names()
    )
