"""SDXL 9-channel inpainting (the layout of stable-diffusion-xl-1.0-inpainting-0.1) on tiny random models:
single file (sgm layout) and diffusers folder load, and inpainting equals diffusers'
StableDiffusionXLInpaintPipeline on the same weights (fp32, CPU, 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.models.families import describe
from leansd.models.family import ModelFamily
from leansd.models.loader import load_model
from leansd.models.tiny import build_tiny_components, write_tiny_diffusers_folder, write_tiny_single_file
from leansd.sampling.samplers import build_scheduler
from tests.tiny.test_img2img_inpaint import composite, init_image, square_mask

SIZE = 64


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-inpaint")
    return {
        "single": write_tiny_single_file(root / "tiny-sdxl-inpaint.safetensors", family=ModelFamily.SDXL,
                                         inpainting=True),
        "folder": write_tiny_diffusers_folder(root / "tiny-sdxl-inpaint", family=ModelFamily.SDXL, inpainting=True),
    }


@pytest.fixture(scope="module")
def single_engine(files) -> Engine:
    return Engine(load_model(files["single"]), device="cpu", precision="full", prompt_cache=False)


@pytest.fixture(scope="module")
def folder_engine(files) -> Engine:
    return Engine(load_model(files["folder"]), device="cpu", precision="full", prompt_cache=False)


def _request(**kw) -> GenerationRequest:
    base = dict(prompt="a yellow square", negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5,
                seed=21, init_image=init_image(), mask=square_mask(), mask_blur=0)
    base.update(kw)
    return GenerationRequest(**base).validated()


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _pipe(engine: Engine, sampler: str, seeds: list[int]):
    from diffusers import StableDiffusionXLInpaintPipeline

    b = engine.bundle
    pipe = StableDiffusionXLInpaintPipeline(
        vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2, tokenizer=b.tokenizer,
        tokenizer_2=b.tokenizer_2, unet=b.unet, scheduler=build_scheduler(sampler, b.scheduler_config, seeds=seeds),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_what_loads(files):
    reference = build_tiny_components(family=ModelFamily.SDXL, inpainting=True)
    for kind in ("single", "folder"):
        bundle = load_model(files[kind])
        assert bundle.family is ModelFamily.SDXL_INPAINT and bundle.is_inpainting
        assert bundle.unet.config.in_channels == 9 and bundle.unet.config.addition_embed_type == "text_time"
        assert bundle.text_encoder_2 is not None and bundle.tokenizer_2.pad_token == "!"
        assert bundle.vae.config.scaling_factor == 0.13025
        expected = reference.unet.state_dict()
        got = bundle.unet.state_dict()
        assert set(got) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key].float(), value, rtol=0, atol=0, msg=key)
    spec = describe(ModelFamily.SDXL_INPAINT)
    assert spec.inpainting and spec.pooled_output and spec.native_size == 1024
    assert spec.unet_parameters == describe(ModelFamily.SDXL).unet_parameters + 5 * 320 * 9


@pytest.mark.parametrize("source", ["single", "folder"])
@pytest.mark.parametrize(("sampler", "strength"), [("DDIM", 1.0), ("Euler a", 0.7), ("DPM++ 2M Karras", 1.0)])
def test_inpaint_matches_diffusers(request, source, sampler, strength):
    # One image per call: with several, diffusers encodes the masked image once with the first generator and
    # shares it, while leansd draws each image's from its own seed (batch item i = a single run with seed i).
    engine = request.getfixturevalue(f"{source}_engine")
    req = _request(sampler=sampler, strength=strength)
    ours = engine.generate(req, progress_bar=False)
    ref = _pipe(engine, sampler, ours.seeds)(
        prompt=req.prompt, negative_prompt=req.negative_prompt, image=req.init_image, mask_image=req.mask,
        strength=req.strength, num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
        height=SIZE, width=SIZE, generator=_generators(ours.seeds), output_type="np",
    ).images
    assert ours.pixels.shape == ref.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(ours.pixels, composite(ref, req.mask), atol=1e-4)
    inside = np.asarray(req.mask) == 255
    original = np.asarray(init_image(), np.float32) / 255
    assert np.abs(ref[0][inside] - original[inside]).max() > 0.05  # the masked area was regenerated


def test_batch_item_equals_a_single_run(single_engine):
    batch = single_engine.generate(_request(sampler="Euler a", strength=0.8, batch_size=2), progress_bar=False)
    single = single_engine.generate(_request(sampler="Euler a", strength=0.8, seed=22), progress_bar=False)
    np.testing.assert_allclose(batch.pixels[1], single.pixels[0], atol=1e-5)
    assert np.abs(batch.pixels[0] - batch.pixels[1]).max() > 0.05


def test_the_mask_channels_are_used(single_engine):
    """Same seed, another mask: the masked-image channels change the regenerated area (not inert)."""
    from PIL import Image

    a = single_engine.generate(_request(sampler="DDIM", strength=1.0), progress_bar=False)
    shifted = np.zeros((SIZE, SIZE), np.uint8)
    shifted[8:56, 24:56] = 255  # a larger mask that covers the first one
    b = single_engine.generate(_request(sampler="DDIM", strength=1.0, mask=Image.fromarray(shifted)),
                               progress_bar=False)
    inside = np.asarray(square_mask()) == 255
    assert np.abs(a.pixels[0][inside] - b.pixels[0][inside]).max() > 1e-3


def test_txt2img_uses_the_all_masked_channels(single_engine):
    """txt2img on a 9-channel model: mask 1 everywhere and the latents of an all-grey image (posterior mean,
    as AUTOMATIC1111) = diffusers' inpainting pipeline at strength 1, full white mask, those masked latents."""
    from PIL import Image

    req = GenerationRequest(prompt="a red fox", negative_prompt="grey", width=SIZE, height=SIZE,
                            num_inference_steps=4, guidance_scale=7.5, sampler="Euler", seed=3).validated()
    ours = single_engine.generate(req, progress_bar=False)
    vae = single_engine.bundle.vae
    with torch.no_grad():
        grey_latents = vae.encode(torch.zeros(1, 3, SIZE, SIZE)).latent_dist.mode() * vae.config.scaling_factor
    ref = _pipe(single_engine, req.sampler, ours.seeds)(
        prompt=req.prompt, negative_prompt=req.negative_prompt, image=Image.new("RGB", (SIZE, SIZE), (128, 128, 128)),
        mask_image=Image.new("L", (SIZE, SIZE), 255), masked_image_latents=grey_latents, strength=1.0,
        num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale, height=SIZE, width=SIZE,
        generator=_generators(ours.seeds), output_type="np",
    ).images
    assert ours.pixels.shape == ref.shape == (1, SIZE, SIZE, 3)
    assert np.abs(ours.pixels - ref).max() < 1e-4
    assert ours.pixels.std() > 0.02


def test_img2img_on_a_nine_channel_model(single_engine):
    req = GenerationRequest(prompt="a yellow square", negative_prompt="blurry", num_inference_steps=4,
                            guidance_scale=7.5, sampler="DDIM", seed=5, init_image=init_image(), strength=0.5)
    out = single_engine.generate(req, progress_bar=False)
    again = single_engine.generate(req, progress_bar=False)
    assert out.images[0].size == (SIZE, SIZE)
    np.testing.assert_array_equal(out.pixels, again.pixels)
    assert np.abs(out.pixels[0] - np.asarray(init_image(), np.float32) / 255).mean() < 0.5
