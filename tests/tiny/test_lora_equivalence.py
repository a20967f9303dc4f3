"""LoRA on whole generations: equal to diffusers' load_lora_weights + fuse_lora, same picture in every memory mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leansd import Engine, GenerationRequest
from leansd.models.library import ModelLibrary
from leansd.sampling.samplers import build_scheduler
from tests.helpers import tiny_bundle, tiny_kohya_lora

SIZE = 64


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> ModelLibrary:
    root = tmp_path_factory.mktemp("data")
    (root / "models" / "Lora").mkdir(parents=True)
    save_file(tiny_kohya_lora(seed=1), str(root / "models" / "Lora" / "ink.safetensors"))  # rank 4, alpha 2
    return ModelLibrary(data_dir=root)


def request(prompt: str, **kw) -> GenerationRequest:
    base = dict(prompt=prompt, negative_prompt="blurry", width=SIZE, height=SIZE, num_inference_steps=4,
                sampler="DDIM", seed=3, guidance_scale=7.5)
    base.update(kw)
    return GenerationRequest(**base)


def test_lora_matches_diffusers_fuse_lora(library: ModelLibrary) -> None:
    pytest.importorskip("peft")  # diffusers' LoRA loader needs it (test extra)
    from diffusers import StableDiffusionPipeline

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    ours = engine.generate(request("a red fox <lora:ink:0.8>"), progress_bar=False).pixels
    plain = engine.generate(request("a red fox"), progress_bar=False).pixels

    b = tiny_bundle()
    pipe = StableDiffusionPipeline(
        vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
        scheduler=build_scheduler("DDIM", b.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tiny_kohya_lora(seed=1), adapter_name="ink")
    pipe.fuse_lora(lora_scale=0.8)
    reference = pipe(
        prompt="a red fox", negative_prompt="blurry", height=SIZE, width=SIZE, num_inference_steps=4,
        guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(3)], output_type="np",
    ).images
    assert np.abs(ours - plain).max() > 0.1  # the LoRA matters...
    np.testing.assert_allclose(ours, reference, atol=5e-5, rtol=0)  # ...and is the same LoRA as diffusers'


@pytest.mark.parametrize(
    "memory",
    [dict(memory_policy="medvram"), dict(memory_policy="lowvram"), dict(memory_policy="lowvram", vae_on_cpu=True),
     dict(vram="1G", turbo=True)],
)
def test_same_picture_with_a_lora_in_every_memory_mode(library: ModelLibrary, memory: dict) -> None:
    prompt = "a red fox <lora:ink:0.8>"
    resident = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    expected = resident.generate(request(prompt), progress_bar=False).pixels
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library,
                    virtual_device=True, efficient_attention=False, **memory)
    for _ in range(2):  # the second request starts from what the first left placed (and the same LoRA set)
        result = engine.generate(request(prompt), progress_bar=False)
        np.testing.assert_allclose(result.pixels, expected, atol=1e-5, rtol=0, err_msg=result.memory_plan)
    # Switching the LoRA off gives the plain picture in this mode too.
    plain = resident.generate(request("a red fox"), progress_bar=False).pixels
    np.testing.assert_allclose(engine.generate(request("a red fox"), progress_bar=False).pixels, plain, atol=1e-5,
                               rtol=0)


def test_streamed_unet_applies_the_lora_layer_by_layer(library: ModelLibrary) -> None:
    """At 128x128 and the minimum budget the UNet streams; the LoRA still applies, same picture."""
    from leansd.engine.planner import PlanRequest, candidate_plans

    prompt = "a red fox <lora:ink:0.8>"
    req = request(prompt, width=128, height=128, num_inference_steps=2)
    expected = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False,
                      library=library).generate(req, progress_bar=False).pixels
    probe = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, efficient_attention=False)
    plan_request = PlanRequest(width=128, height=128, batch=1, vae_on_cpu=True)
    minimum = min(p.peak for _, p in candidate_plans(probe.sizes, plan_request, None, policy="lowvram"))
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library,
                    vram=minimum, turbo=True, vae_on_cpu=True, memory_policy="lowvram", virtual_device=True,
                    efficient_attention=False)
    result = engine.generate(req, progress_bar=False)
    assert "stream" in result.memory_plan
    np.testing.assert_allclose(result.pixels, expected, atol=1e-5, rtol=0)
