"""Request validation: every bad value gets a clear one-line error naming the valid range."""

from __future__ import annotations

import pytest

from leansd.errors import InvalidRequestError
from leansd.request import GenerationRequest
from leansd.sampling.samplers import canonical_sampler_name, sampler_names


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 100}, "width must be a multiple of 8"),
        ({"height": 510}, "height must be a multiple of 8"),
        ({"width": 32}, "between 64 and 4096"),
        ({"height": 100000}, "between 64 and 4096"),
        ({"num_inference_steps": 0}, "steps must be between 1"),
        ({"num_inference_steps": 5000}, "steps must be between 1"),
        ({"batch_size": 0}, "n_samples (batch size) must be between 1"),
        ({"n_iter": 0}, "n_iter must be between 1"),
        ({"guidance_scale": -1.0}, "scale (CFG) must be between 0 and 30"),
        ({"guidance_scale": 1e38}, "scale (CFG) must be between 0 and 30 (AUTOMATIC1111's range), got 1e+38"),
        ({"guidance_scale": 30.5}, "scale (CFG) must be between 0 and 30"),
        ({"eta": 1e300}, "ddim_eta must be between 0 and 1"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"eta": -0.1}, "ddim_eta must be between 0 and 1"),
        ({"sampler": "Euler b"}, "unknown sampler 'Euler b'; valid samplers: DDIM, PLMS, Euler, Euler a"),
        ({"seed": -5}, "seed must be between 0 and 4294967295"),
        ({"prompt": "a \udcff fox"}, "prompt is not valid text"),
        ({"seed": 2**32 - 1, "batch_size": 2}, "seed must be between"),
        ({"width": 64.0}, "width must be an integer"),
        ({"prompt": None}, "prompt must be a string"),
    ],
)
def test_bad_values(changes: dict, message: str) -> None:
    request = GenerationRequest(prompt="x", **{k: v for k, v in changes.items() if k != "prompt"})
    if "prompt" in changes:
        request.prompt = changes["prompt"]
    with pytest.raises(InvalidRequestError) as info:
        request.validated()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_valid_request_gets_seed_and_canonical_sampler() -> None:
    r = GenerationRequest(prompt="x", sampler="euler_a", seed=-1).validated()
    assert r.sampler == "Euler a"
    assert 0 <= r.seed <= 2**32 - 1
    r = GenerationRequest(prompt="x", seed=10, batch_size=2, n_iter=3).validated()
    assert r.image_seeds() == [10, 11, 12, 13, 14, 15]
    r = GenerationRequest(prompt="x", seed=10, batch_size=2, n_iter=2, fixed_code=True).validated()
    assert r.image_seeds() == [10, 11, 10, 11]
    r = GenerationRequest(prompt="x", seed=None, batch_size=64, n_iter=10_000).validated()
    assert r.seed + r.num_images - 1 <= 2**32 - 1


def test_numpy_numbers_and_none_negative_prompt_are_accepted() -> None:
    import numpy as np

    r = GenerationRequest(
        prompt="x", negative_prompt=None, width=np.int64(64), num_inference_steps=np.int32(5),
        guidance_scale=np.float32(7.5), seed=np.int64(3),
    ).validated()
    assert (r.width, r.num_inference_steps, r.seed, r.negative_prompt) == (64, 5, 3, "")
    assert type(r.width) is int and type(r.guidance_scale) is float


def test_step_limits_per_sampler() -> None:
    from leansd.models.configs import SD1_SCHEDULER_CONFIG
    from leansd.sampling.samplers import SAMPLERS, build_scheduler

    for spec in SAMPLERS:
        most = spec.max_steps or 1000
        GenerationRequest(prompt="x", sampler=spec.name, num_inference_steps=most).validated()
        scheduler = build_scheduler(spec.name, SD1_SCHEDULER_CONFIG, seeds=[0])
        scheduler.set_timesteps(most)
        assert 0 <= float(scheduler.timesteps.min()) and float(scheduler.timesteps.max()) <= 999, spec.name
        if spec.max_steps:
            with pytest.raises(InvalidRequestError, match=f"steps must be between 1 and {most} for {spec.name}"):
                GenerationRequest(prompt="x", sampler=spec.name, num_inference_steps=most + 1).validated()


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("ddim", "DDIM"), ("plms", "PLMS"), ("euler", "Euler"), ("euler_a", "Euler a"), ("k_euler_a", "Euler a"),
        ("heun", "Heun"), ("dpm2", "DPM2"), ("dpm2_a", "DPM2 a"), ("lms", "LMS"), ("dpmpp_2m", "DPM++ 2M"),
        ("DPM++ 2M Karras", "DPM++ 2M Karras"), ("dpm++ 2m karras", "DPM++ 2M Karras"),
        ("dpmpp_sde_karras", "DPM++ SDE Karras"), ("UniPC", "UniPC"), ("lcm", "LCM"),
    ],
)
def test_sampler_aliases(alias: str, name: str) -> None:
    assert canonical_sampler_name(alias) == name


def test_every_sampler_builds_its_scheduler() -> None:
    from leansd.models.configs import SD1_SCHEDULER_CONFIG
    from leansd.sampling.samplers import build_scheduler, get_sampler

    for name in sampler_names():
        scheduler = build_scheduler(name, SD1_SCHEDULER_CONFIG, seeds=[1])
        assert type(scheduler).__name__ == get_sampler(name).scheduler_class
        assert scheduler.config.beta_schedule == "scaled_linear"
        assert scheduler.config.beta_start == 0.00085 and scheduler.config.beta_end == 0.012


def test_ddim_and_plms_use_compvis_timesteps() -> None:
    """CompVis make_ddim_timesteps('uniform', 50) = range(0, 1000, 20) + 1 -> 981 ... 1."""
    from leansd.models.configs import SD1_SCHEDULER_CONFIG
    from leansd.sampling.samplers import build_scheduler

    ddim = build_scheduler("DDIM", SD1_SCHEDULER_CONFIG)
    ddim.set_timesteps(50)
    assert ddim.timesteps.tolist() == list(range(981, 0, -20))
    assert float(ddim.final_alpha_cumprod) == pytest.approx(float(ddim.alphas_cumprod[0]))  # set_alpha_to_one=False
    plms = build_scheduler("PLMS", SD1_SCHEDULER_CONFIG)
    plms.set_timesteps(50)
    assert sorted(set(plms.timesteps.tolist()), reverse=True) == list(range(981, 0, -20))


def test_engine_precision_and_device_validation() -> None:
    from leansd.engine.device import resolve_device, resolve_precision

    cpu = resolve_device("cpu")
    assert resolve_precision("auto", cpu).name == "full"
    assert str(resolve_precision("bf16", cpu).weight_dtype) == "torch.bfloat16"
    with pytest.raises(InvalidRequestError, match="unknown precision 'fp8'; valid: auto, full, autocast, fp16, bf16"):
        resolve_precision("fp8", cpu)
    with pytest.raises(InvalidRequestError, match="unknown device"):
        resolve_device("tpu9")


@pytest.mark.parametrize("field", ["sampler", "resize_mode", "inpainting_fill", "prompt_syntax", "num_inference_steps"])
def test_long_bad_values_are_not_echoed_whole(field: str) -> None:
    value = "x" * 100_000
    with pytest.raises(InvalidRequestError) as info:
        GenerationRequest(prompt="x", **{field: value}).validated()
    message = str(info.value)
    assert len(message) < 400 and "(100002 characters)" in message, message[:400]


def test_validated_request_is_checked_once_and_changes_clear_it() -> None:
    request = GenerationRequest(prompt="x", seed=None, sampler="euler_a")
    assert not request.is_validated
    checked = request.validated()
    assert checked.is_validated and checked.sampler == "Euler a" and checked.seed is not None
    # Validating again returns the very same request: same random seed, no second pass over the checks.
    assert checked.validated() is checked
    # Any later change must be checked again, and a bad one is refused as on the first validation.
    checked.width = 100
    assert not checked.is_validated
    with pytest.raises(InvalidRequestError, match="width must be a multiple of 8, got 100"):
        checked.validated()
    # A copy made with dataclasses.replace is a new, unchecked request.
    from dataclasses import replace

    assert not replace(request.validated(), width=64).is_validated


def test_engine_generate_validates_once_on_entry() -> None:
    from leansd import Engine
    from tests.helpers import tiny_bundle

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False)
    request = GenerationRequest(prompt="a fox", num_inference_steps=2, width=64, height=64, seed=3)
    result = engine.generate(request)
    assert result.request.is_validated and result.request.seed == 3
    # A request a front end validated passes through unchanged (the result holds that very object).
    checked = request.validated()
    assert engine.generate(checked).request is checked
    # The pipelines take only validated requests; they do not check (or copy) a request again.
    from leansd.pipelines import generate

    with pytest.raises(ValueError, match="pipelines take a validated request"):
        generate(engine, request)
    bad = request.validated()
    bad.num_inference_steps = 0
    with pytest.raises(InvalidRequestError, match="steps must be between 1"):
        engine.generate(bad)
