"""Sampler registry: the names users know (AUTOMATIC1111, optimizedSD) -> diffusers schedulers.

Schedulers are stateful, so `build_scheduler` makes a fresh one for every sampling run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leansd.errors import InvalidRequestError, brief

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    """Canonical (AUTOMATIC1111) spelling."""
    scheduler_class: str
    """Class name in `diffusers`."""
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    """Other spellings, e.g. optimizedSD's `euler_a`."""
    max_steps: int | None = None
    """Most steps the scheduler can place (None: the request's general limit)."""
    second_order: bool = False
    """Evaluates the model about twice per step; AUTOMATIC1111 then counts prompt-editing steps twice."""


# DDIM/PLMS keep the CompVis "leading" timestep placement (steps_offset=1 in the base config);
# the k-diffusion-style samplers use diffusers' defaults ("linspace" spacing, as A1111's k-samplers).
SAMPLERS: tuple[SamplerSpec, ...] = (
    # With steps_offset=1, 1000 "leading" steps would place a timestep at 1000 (out of range).
    SamplerSpec("DDIM", "DDIMScheduler", {"timestep_spacing": "leading"}, ("ddim",), max_steps=999),
    SamplerSpec(
        "PLMS", "PNDMScheduler", {"timestep_spacing": "leading", "skip_prk_steps": True}, ("plms", "pndm"), 999
    ),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, ("euler", "k_euler")),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, ("euler_a", "k_euler_a", "euler_ancestral")),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, ("heun", "k_heun"), second_order=True),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, ("dpm2", "k_dpm_2"), second_order=True),
    SamplerSpec(
        "DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("dpm2_a", "k_dpm_2_a", "dpm2_ancestral"), second_order=True
    ),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, ("lms", "k_lms")),
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", {}, ("dpmpp_2m", "dpm_solver++")),
    SamplerSpec(
        "DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, ("dpmpp_2m_karras",)
    ),
    SamplerSpec(
        "DPM++ SDE Karras", "DPMSolverSDEScheduler", {"use_karras_sigmas": True}, ("dpmpp_sde_karras",),
        second_order=True,
    ),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, ("unipc",)),
    # LCM places its steps on a 50-step "original" schedule.
    SamplerSpec("LCM", "LCMScheduler", {}, ("lcm",), max_steps=50),
)


def _normalise(name: str) -> str:
    # "DPM++ 2M Karras", "dpmpp-2m-karras" and "dpmpp_2m_karras" are the same sampler.
    key = name.strip().lower().replace("++", "pp")
    return re.sub(r"[\s\-_]+", "_", key)


_BY_KEY: dict[str, SamplerSpec] = {}
for _spec in SAMPLERS:
    for _alias in (_spec.name, *_spec.aliases):
        _BY_KEY[_normalise(_alias)] = _spec


def sampler_names() -> list[str]:
    """Canonical names, in menu order."""
    return [spec.name for spec in SAMPLERS]


def get_sampler(name: str) -> SamplerSpec:
    if not isinstance(name, str) or _normalise(name) not in _BY_KEY:
        raise InvalidRequestError(
            f"unknown sampler {brief(name)}; valid samplers: {', '.join(sampler_names())}"
        )
    return _BY_KEY[_normalise(name)]


def canonical_sampler_name(name: str) -> str:
    return get_sampler(name).name


def build_scheduler(
    name: str, base_config: dict[str, Any], *, seeds: list[int] | None = None
) -> "SchedulerMixin":
    """A fresh scheduler for one sampling run.

    `base_config` is the model's training schedule (betas, timesteps). `seeds` (one per image)
    seed the Brownian tree of the SDE sampler, so its noise is reproducible per image.
    """
    import diffusers

    spec = get_sampler(name)
    cls = getattr(diffusers, spec.scheduler_class)
    accepted = set(cls._get_init_keys(cls))  # only pass what this scheduler understands
    config = {k: v for k, v in {**base_config, **spec.options}.items() if k in accepted}
    if spec.scheduler_class == "DPMSolverSDEScheduler" and seeds is not None:
        config["noise_sampler_seed"] = list(seeds)
    return cls.from_config(config)
