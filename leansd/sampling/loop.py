"""The denoising loop. Pure tensor code: no files, no device choice.

The loop drives a diffusers scheduler and asks a denoiser (:mod:`leansd.sampling.denoiser`, which
owns the UNet call, guidance and conditioning) for each step's guided prediction.

After every model evaluation the loop reports a typed `StepState` (step, total, timestep, the
current latents and the model's denoised estimate x0) to its `on_step` callback: progress, live
previews and cancellation hang there.

How x0 is obtained. Every diffusers scheduler we map runs the model on one of two latent
parameterisations, and x0 follows from the model output with one affine formula,
x0 = (x_hat - sqrt(1 - abar) * eps) / sqrt(abar) (epsilon prediction; v-prediction:
x0 = sqrt(abar) * x_hat - sqrt(1 - abar) * v), where x_hat is the UNet input and abar the
cumulative alpha of this evaluation:
- k-diffusion ("sigma") schedulers (Euler, Euler a, Heun, DPM2, DPM2 a, LMS, DPM++ SDE Karras): the
  latents are x0 + sigma * eps and `scale_model_input` divides them by sqrt(sigma^2 + 1), so
  abar = 1 / (sigma^2 + 1) with sigma the one this evaluation used (Heun's and DPM2's second
  evaluations use sigma_next / the interpolated sigma). This is exactly their own
  `pred_original_sample` (x - sigma * eps).
- DPM++ 2M (Karras) and UniPC (DPM-Solver parameterisation, sigmas possibly Karras-spaced): abar
  from the sigma of the step just taken (`scheduler.sigmas[step_index - 1]`), as their
  `convert_model_output` computes x0; they do not return it.
- DDIM, PLMS and LCM (DDPM parameterisation): abar = `alphas_cumprod[t]`. DDIM returns the same as
  `pred_original_sample`; PLMS does not return one (it is computed from the current model output,
  not PLMS's multistep combination); LCM's own `denoised` adds its consistency boundary
  condition (c_skip * x + c_out * x0, c_skip < 1e-4 past its first step), which we leave out.
The same formula applied to one branch of classifier-free guidance gives that branch's x0
(`StepState.denoised_of`): AUTOMATIC1111's "Prompt" / "Negative prompt" live preview content.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from diffusers import SchedulerMixin

    from leansd.sampling.denoiser import Denoiser

from leansd.request import PREVIEW_CONTENTS


@dataclass(frozen=True)
class StepState:
    """One model evaluation of the loop has finished.

    `step` counts evaluations from 1 to `total` (Heun and DPM2 make 2N-1 for N steps). `latents`
    (B, 4, h, w) are the sampler's state after the step (after `after_step`); `denoised` is the
    model's estimate of the clean latents x0 at this evaluation (guided), same shape, in the
    scaled latent space the VAE decodes.
    """

    step: int
    total: int
    timestep: "torch.Tensor"
    latents: "torch.Tensor"
    denoised: "torch.Tensor"
    _branches: dict[str, "torch.Tensor"] = field(default_factory=dict, repr=False, compare=False)
    """Each guidance branch's model output, turned into x0 on demand by `_x0`."""
    _x0: "Callable[[torch.Tensor], torch.Tensor] | None" = field(default=None, repr=False, compare=False)

    def denoised_of(self, content: str = "combined") -> "torch.Tensor":
        """x0 of `content`: "combined" (the guided prediction), "prompt" or "negative-prompt".

        Without guidance (CFG scale <= 1) every content is the prompt's prediction.
        """
        if content not in PREVIEW_CONTENTS:
            raise ValueError(f"unknown preview content {content!r}; valid: {', '.join(PREVIEW_CONTENTS)}")
        if content == "combined":
            return self.denoised
        output = self._branches.get(content)
        if output is None or self._x0 is None:
            return self.denoised
        return self._x0(output)


def step_kwargs(scheduler: "SchedulerMixin", *, eta: float, generators: list["torch.Generator"]) -> dict:
    """Extra `scheduler.step` arguments: eta (DDIM only) and the per-image generators (ancestral noise)."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def sigma_space(scheduler: "SchedulerMixin") -> bool:
    """True for k-diffusion-style schedulers: latents x0 + sigma * eps, input scaled by 1/sqrt(sigma^2 + 1)."""
    return float(scheduler.init_noise_sigma) != 1.0


class X0Estimator:
    """x0 from a model output at one evaluation: x0 = a * x_hat + b * output (see the module docstring).

    Built in two halves because the schedulers expose the evaluation's noise level at different
    moments: `before_step` (the input scale of k-diffusion schedulers) and `after_step` (the
    DPM-Solver step index).
    """

    def __init__(self, scheduler: "SchedulerMixin") -> None:
        self.scheduler = scheduler
        self.sigma_space = sigma_space(scheduler)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self._abar: "torch.Tensor | None" = None

    def before_step(self, t: "torch.Tensor", like: "torch.Tensor") -> None:
        import torch

        self._abar = None
        if self.sigma_space:
            # scale_model_input divides by sqrt(sigma^2 + 1) = 1 / sqrt(abar); it only reads the
            # scheduler's state here (the step index is already set by the real call).
            probe = torch.ones((), device=like.device, dtype=torch.float32)
            self._abar = self.scheduler.scale_model_input(probe, t).float() ** 2

    def after_step(self, t: "torch.Tensor") -> None:
        if self._abar is not None:
            return
        scheduler = self.scheduler
        index = getattr(scheduler, "step_index", None)
        if hasattr(scheduler, "_sigma_to_alpha_sigma_t") and index is not None:
            sigma = scheduler.sigmas[index - 1].float()  # DPM-Solver parameterisation
            self._abar = 1.0 / (sigma**2 + 1.0)
        else:
            self._abar = scheduler.alphas_cumprod[int(t)].float()

    def at(self, x_hat: "torch.Tensor") -> "Callable[[torch.Tensor], torch.Tensor]":
        """x0 (float32) as a function of the model output (eps, v or x0) for the UNet input `x_hat`
        of this evaluation; it keeps this evaluation's noise level."""
        import torch

        if self._abar is None:
            raise RuntimeError("X0Estimator: call before_step and after_step first")
        abar = self._abar.to(device=x_hat.device)
        a, b = abar.sqrt(), (1.0 - abar).clamp(min=0).sqrt()
        x_hat = x_hat.float()
        kind = self.prediction_type

        def x0(output: "torch.Tensor") -> "torch.Tensor":
            output = output.float()
            if kind == "v_prediction":
                return a * x_hat - b * output  # Salimans & Ho 2022: v = a * eps - b * x0
            if kind == "sample":
                return output
            return (x_hat - b * output) / torch.clamp(a, min=1e-8)  # DDPM: x_t = a * x0 + b * eps

        return x0


def denoise(
    *,
    denoiser: "Denoiser",
    scheduler: "SchedulerMixin",
    latents: "torch.Tensor",
    generators: list["torch.Generator"],
    eta: float = 0.0,
    timesteps: "torch.Tensor | None" = None,
    first_step: int = 0,
    total: int | None = None,
    after_step: Callable[[int, "torch.Tensor"], "torch.Tensor"] | None = None,
    on_step: Callable[[StepState], None] | None = None,
) -> "torch.Tensor":
    """Run the sampler from the starting latents over `timesteps`; returns the latents after the last one.

    `latents` (B, 4, h, w) are the starting latents, already scaled for the scheduler (pure noise
    times `init_noise_sigma` for txt2img, a noised image latent for img2img). The scheduler must
    already have its timesteps set; `timesteps` (default: all of them) is the part to run (img2img
    strength; one expert's share of an ensemble). `denoiser(x, t, step)` gives the guided model
    prediction of loop step `step` (:class:`~leansd.sampling.denoiser.Denoiser`). Loop steps are
    numbered from `first_step` (a run that continues another one: the refiner after the base), out of
    `total` (default: `first_step + len(timesteps)`). `after_step(step, latents)` may replace the
    latents after a step (legacy inpainting re-imposes the known region there). `on_step(state)`
    receives a `StepState` after every evaluation; it may raise to stop the loop.
    """
    extra = step_kwargs(scheduler, eta=eta, generators=generators)
    if timesteps is None:
        timesteps = scheduler.timesteps
    if total is None:
        total = first_step + len(timesteps)
    estimate = X0Estimator(scheduler) if on_step is not None else None
    for i, t in enumerate(timesteps, start=first_step):
        scaled = scheduler.scale_model_input(latents, t)  # elementwise: scaling once serves every pass
        if on_step is not None:
            prediction = denoiser.predict(scaled, t, i)
            noise_pred, branches = prediction.guided, prediction.branches
        else:
            noise_pred, branches = denoiser(scaled, t, i), {}
        if estimate is not None:
            estimate.before_step(t, latents)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if after_step is not None:
            latents = after_step(i, latents)
        if on_step is not None and estimate is not None:
            estimate.after_step(t)
            x0 = estimate.at(scaled)
            on_step(StepState(step=i + 1, total=total, timestep=t, latents=latents,
                              denoised=x0(noise_pred), _branches=branches, _x0=x0))
    return latents
