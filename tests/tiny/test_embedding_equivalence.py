"""Textual inversion on whole generations equals diffusers' load_textual_inversion on the same vectors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from leansd import Engine, GenerationRequest
from leansd.models.library import ModelLibrary
from leansd.sampling.samplers import build_scheduler
from tests.helpers import tiny_bundle


def test_multi_vector_embedding_matches_diffusers(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    (tmp_path / "embeddings").mkdir()
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "embeddings" / "badhands.pt"
    torch.save({"string_to_param": {"*": vectors}, "name": "badhands", "step": 10}, path)  # A1111 layout

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False,
                    library=ModelLibrary(data_dir=tmp_path))
    request = GenerationRequest(prompt="a red fox, badhands", negative_prompt="blurry", width=64, height=64,
                                num_inference_steps=4, sampler="DDIM", seed=3)
    ours = engine.generate(request, progress_bar=False).pixels
    plain = engine.generate(GenerationRequest(prompt="a red fox,", negative_prompt="blurry", width=64, height=64,
                                              num_inference_steps=4, sampler="DDIM", seed=3), progress_bar=False).pixels

    b = tiny_bundle()
    pipe = StableDiffusionPipeline(
        vae=b.vae, text_encoder=b.text_encoder, tokenizer=copy.deepcopy(b.tokenizer), unet=b.unet,
        scheduler=build_scheduler("DDIM", b.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(path), token="badhands")
    reference = pipe(prompt="a red fox, badhands", negative_prompt="blurry", height=64, width=64,
                     num_inference_steps=4, guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(3)],
                     output_type="np").images
    assert np.abs(ours - plain).max() > 0.05
    np.testing.assert_allclose(ours, reference, atol=5e-5, rtol=0)
