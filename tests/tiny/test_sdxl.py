"""SDXL base txt2img on tiny random models equals diffusers' StableDiffusionXLPipeline (fp32, CPU, 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.models.family import ModelFamily
from leansd.models.loader import load_model
from leansd.models.tiny import write_tiny_diffusers_folder, write_tiny_single_file
from leansd.sampling.samplers import build_scheduler

SIZE = 64


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {
        "single": write_tiny_single_file(root / "tiny-sdxl.safetensors", family=ModelFamily.SDXL),
        "folder": write_tiny_diffusers_folder(root / "tiny-sdxl", family=ModelFamily.SDXL),
    }


@pytest.fixture(scope="module")
def single_engine(files) -> Engine:
    return Engine(load_model(files["single"]), device="cpu", precision="full", prompt_cache=False)


@pytest.fixture(scope="module")
def folder_engine(files) -> Engine:
    return Engine(load_model(files["folder"]), device="cpu", precision="full", prompt_cache=False)


def reference(engine: Engine, req: GenerationRequest, seeds: list[int]) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    b = engine.bundle
    pipe = StableDiffusionXLPipeline(
        vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2, tokenizer=b.tokenizer,
        tokenizer_2=b.tokenizer_2, unet=b.unet, scheduler=build_scheduler(req.sampler, b.scheduler_config, seeds=seeds),
        force_zeros_for_empty_prompt=False,  # leansd encodes an empty negative prompt, as AUTOMATIC1111
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=req.prompt, negative_prompt=req.negative_prompt, height=SIZE, width=SIZE,
        num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale, eta=req.eta,
        num_images_per_prompt=len(seeds), generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
    ).images


def test_what_loads(files):
    for kind in ("single", "folder"):
        bundle = load_model(files[kind])
        assert bundle.family is ModelFamily.SDXL
        assert bundle.tokenizer.pad_token == "<|endoftext|>" and bundle.tokenizer_2.pad_token == "!"
        assert bundle.text_layer == -2 and bundle.vae.config.scaling_factor == 0.13025
        assert bundle.unet.config.addition_embed_type == "text_time"


@pytest.mark.parametrize("source", ["single", "folder"])
@pytest.mark.parametrize(("sampler", "negative"), [("DDIM", "blurry, low quality"), ("Euler a", ""),
                                                   ("DPM++ 2M Karras", "grey")])
def test_txt2img_matches_diffusers(request, source, sampler, negative):
    engine = request.getfixturevalue(f"{source}_engine")
    req = GenerationRequest(prompt="a photograph of an astronaut riding a horse", negative_prompt=negative,
                            width=SIZE, height=SIZE, num_inference_steps=4, guidance_scale=7.5, sampler=sampler,
                            eta=0.5 if sampler == "DDIM" else 0.0, seed=1234, batch_size=2)
    ours = engine.generate(req, progress_bar=False)
    ref = reference(engine, req, ours.seeds)
    assert ours.pixels.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours.pixels - ref).max() < 1e-4
    assert ref.std() > 0.05 and np.abs(ref[0] - ref[1]).max() > 0.05
