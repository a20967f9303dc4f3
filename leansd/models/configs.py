"""Architecture and noise-schedule configurations of the Stable Diffusion families."""

from __future__ import annotations

from typing import Any

# SD 1.x training schedule (CompVis v1-inference.yaml: linear_start 0.00085, linear_end 0.012,
# 1000 timesteps, "scaled_linear" = linspace in sqrt space). steps_offset=1 and
# set_alpha_to_one=False reproduce the CompVis DDIM/PLMS timestep placement (1, 21, ..., 981 for
# 50 steps, final alpha_prev = alphas_cumprod[0]).
SD1_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
}

SD1_VAE_SCALING_FACTOR = 0.18215
