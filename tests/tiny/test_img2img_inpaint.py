"""img2img and inpainting equal diffusers' pipelines on the same tiny weights (fp32, CPU).

Where leansd deliberately differs (the final composite of inpainting), the difference itself is
tested.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from leansd import Engine, GenerationRequest
from leansd.sampling.samplers import build_scheduler
from tests.helpers import tiny_bundle, tiny_inpaint_bundle

SIZE = 64


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_bundle(), device="cpu", precision="full")


@pytest.fixture(scope="module")
def inpaint_engine() -> Engine:
    return Engine(tiny_inpaint_bundle(), device="cpu", precision="full")


def init_image() -> Image.Image:
    """A smooth colour gradient with a square: structure the VAE can carry."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    rgb[16:40, 20:44] = (250, 250, 30)
    return Image.fromarray(rgb)


def square_mask() -> Image.Image:
    """Binary, aligned to the 8-pixel latent grid: white (regenerate) on the right half."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:56, 32:56] = 255
    return Image.fromarray(m)


def pipeline(cls, engine: Engine, sampler: str, seeds: list[int]):
    b = engine.bundle
    pipe = cls(
        vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
        scheduler=build_scheduler(sampler, b.scheduler_config, seeds=seeds),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a yellow square", negative_prompt="blurry", num_inference_steps=6, guidance_scale=7.5,
                seed=21, init_image=init_image())
    base.update(kw)
    return GenerationRequest(**base)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_matches_diffusers(engine: Engine, sampler: str, strength: float) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    req = request(sampler=sampler, strength=strength, batch_size=2)
    ours = engine.generate(req, progress_bar=False)
    ref = pipeline(StableDiffusionImg2ImgPipeline, engine, sampler, ours.seeds)(
        prompt=req.prompt, negative_prompt=req.negative_prompt, image=req.init_image, strength=strength,
        num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
        num_images_per_prompt=2, generator=generators(ours.seeds), output_type="np",
    ).images
    assert ours.pixels.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours.pixels - ref).max() < 1e-4
    assert f"Denoising strength: {strength:g}" in ours.infotexts[0]


def test_img2img_strength_one_ignores_the_image(engine: Engine) -> None:
    with_image = engine.generate(request(strength=1.0, sampler="Euler a"), progress_bar=False)
    txt = engine.generate(request(strength=1.0, sampler="Euler a", init_image=None, width=SIZE, height=SIZE),
                          progress_bar=False)
    np.testing.assert_array_equal(with_image.pixels, txt.pixels)


def test_img2img_strength_zero_is_a_vae_round_trip(engine: Engine) -> None:
    from leansd.inputs.images import image_to_tensor

    out = engine.generate(request(strength=0.0), progress_bar=False)
    vae = engine.bundle.vae
    with torch.inference_mode():
        posterior = vae.encode(image_to_tensor(init_image())).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(21))
        expected = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out.pixels, expected, atol=1e-5)


def test_img2img_batch_item_equals_single_run(engine: Engine) -> None:
    batch = engine.generate(request(sampler="Euler a", batch_size=2, strength=0.6), progress_bar=False)
    single = engine.generate(request(sampler="Euler a", seed=22, strength=0.6), progress_bar=False)
    np.testing.assert_allclose(batch.pixels[1], single.pixels[0], atol=1e-5)


@pytest.mark.parametrize("mode", ["just-resize", "crop", "fill"])
def test_img2img_output_size_and_resize_modes(engine: Engine, mode: str) -> None:
    wide = init_image().resize((100, 70))
    out = engine.generate(request(init_image=wide, resize_mode=mode, width=64, height=96, num_inference_steps=2),
                          progress_bar=False)
    assert out.images[0].size == (64, 96)
    native = engine.generate(request(init_image=wide, num_inference_steps=2), progress_bar=False)
    assert native.images[0].size == (96, 64)  # the image's own size, rounded down to multiples of 8


def diffusers_inpaint(engine: Engine, req: GenerationRequest, seeds: list[int]) -> np.ndarray:
    from diffusers import StableDiffusionInpaintPipeline

    return pipeline(StableDiffusionInpaintPipeline, engine, req.sampler, seeds)(
        prompt=req.prompt, negative_prompt=req.negative_prompt, image=req.init_image, mask_image=req.mask,
        strength=req.strength, num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
        height=SIZE, width=SIZE, generator=generators(seeds), output_type="np",
    ).images


def composite(ref: np.ndarray, mask: Image.Image) -> np.ndarray:
    """What leansd does after decoding: keep the original outside the (here unblurred) mask."""
    m = (np.asarray(mask, dtype=np.float32) / 255)[None, :, :, None]
    original = np.asarray(init_image(), dtype=np.float32)[None] / 255
    return original * (1 - m) + ref * m


@pytest.mark.parametrize("sampler", ["DDIM", "DPM++ 2M Karras"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_legacy_inpaint_matches_diffusers(engine: Engine, sampler: str, strength: float) -> None:
    req = request(sampler=sampler, strength=strength, mask=square_mask(), mask_blur=0).validated()
    ours = engine.generate(req, progress_bar=False)
    ref = diffusers_inpaint(engine, req, ours.seeds)
    # Identical inside the mask; outside it leansd keeps the original pixels exactly.
    np.testing.assert_allclose(ours.pixels, composite(ref, req.mask), atol=1e-4)
    outside = np.asarray(req.mask) == 0
    assert np.abs(ref[0][outside] - ours.pixels[0][outside]).max() > 1e-3  # the composite matters
    assert "Mask blur: 0" in ours.infotexts[0]


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_nine_channel_inpaint_matches_diffusers(inpaint_engine: Engine, sampler: str, strength: float) -> None:
    req = request(sampler=sampler, strength=strength, mask=square_mask(), mask_blur=0).validated()
    ours = inpaint_engine.generate(req, progress_bar=False)
    ref = diffusers_inpaint(inpaint_engine, req, ours.seeds)
    np.testing.assert_allclose(ours.pixels, composite(ref, req.mask), atol=1e-4)


def test_unmasked_pixels_outside_the_blur_band_are_unchanged(engine: Engine) -> None:
    from PIL import ImageFilter

    req = request(sampler="Euler a", mask=square_mask(), mask_blur=4, strength=0.9, batch_size=2)
    out = engine.generate(req, progress_bar=False)
    band = np.asarray(square_mask().filter(ImageFilter.GaussianBlur(4))) > 0
    original = np.asarray(init_image())
    for image in out.images:
        got = np.asarray(image)
        assert np.array_equal(got[~band], original[~band])
        assert np.abs(got[band].astype(int) - original[band]).max() > 10  # the masked area was regenerated


@pytest.mark.parametrize("fill", ["fill", "latent-noise", "latent-nothing"])
def test_inpainting_fill_modes_change_only_the_start(engine: Engine, fill: str) -> None:
    from PIL import ImageFilter

    base = engine.generate(request(mask=square_mask(), strength=0.5), progress_bar=False)
    other = engine.generate(request(mask=square_mask(), strength=0.5, inpainting_fill=fill), progress_bar=False)
    band = np.asarray(square_mask().filter(ImageFilter.GaussianBlur(4))) > 0
    assert np.array_equal(np.asarray(other.images[0])[~band], np.asarray(init_image())[~band])
    inside = np.asarray(square_mask()) == 255
    assert np.abs(base.pixels[0][inside] - other.pixels[0][inside]).max() > 1e-3
    assert f"Inpainting fill: {fill}" in other.infotexts[0]


def test_invert_mask_swaps_the_regions(engine: Engine) -> None:
    inverted = Image.fromarray(255 - np.asarray(square_mask()))
    a = engine.generate(request(mask=square_mask(), mask_blur=0, sampler="DDIM"), progress_bar=False)
    b = engine.generate(request(mask=inverted, invert_mask=True, mask_blur=0, sampler="DDIM"), progress_bar=False)
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_nine_channel_model_also_does_txt2img(inpaint_engine: Engine) -> None:
    out = inpaint_engine.generate(GenerationRequest(prompt="x", width=SIZE, height=SIZE, num_inference_steps=2,
                                                    seed=1), progress_bar=False)
    assert out.images[0].size == (SIZE, SIZE) and np.isfinite(out.pixels).all()
