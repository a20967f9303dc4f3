"""SDXL base txt2img on tiny random models equals diffusers' StableDiffusionXLPipeline (fp32, CPU, 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.models.families import describe
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
        force_zeros_for_empty_prompt=True,  # an empty negative prompt is zeros, as AUTOMATIC1111
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(  # diffusers zeroes a negative prompt of None (an explicit "" is encoded)
        prompt=req.prompt, negative_prompt=req.negative_prompt or None, height=SIZE, width=SIZE,
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


def test_prompt_cache_stores_the_pooled_embedding(files, tmp_path):
    from leansd.prompts.cache import PromptCache

    engine = Engine(load_model(files["single"]), device="cpu", precision="full",
                    prompt_cache=PromptCache(tmp_path / "prompts"))
    req = GenerationRequest(prompt="a red fox", negative_prompt="grey", width=SIZE, height=SIZE,
                            num_inference_steps=2, sampler="Euler", seed=4)
    first = engine.generate(req, progress_bar=False)
    again = engine.generate(req, progress_bar=False)
    assert first.info["text_encoder_used"] is True and again.info["text_encoder_used"] is False
    np.testing.assert_array_equal(first.pixels, again.pixels)


@pytest.mark.parametrize("policy", ["medvram", "lowvram"])
def test_memory_modes_give_the_same_picture(files, policy):
    from leansd.engine.planner import PlanRequest, plan_memory

    req = GenerationRequest(prompt="a red fox", negative_prompt="blurry", width=SIZE, height=SIZE,
                            num_inference_steps=3, sampler="Euler a", seed=5, batch_size=2)
    resident = Engine(load_model(files["single"]), device="cpu", precision="full", prompt_cache=False)
    expected = resident.generate(req, progress_bar=False).pixels
    minimum = plan_memory(resident.sizes, PlanRequest(width=SIZE, height=SIZE, batch=2), None, policy=policy).minimum
    budget = int(minimum / 0.9) + 1
    constrained = Engine(load_model(files["single"]), device="cpu", precision="full", prompt_cache=False,
                         vram=budget, memory_policy=policy, virtual_device=True, efficient_attention=False)
    out = constrained.generate(req, progress_bar=False)
    assert constrained.plan.placement in ("stages", "stream", "stream-layers")
    assert out.memory_peak_bytes <= budget
    np.testing.assert_allclose(out.pixels, expected, atol=1e-5)


def test_split_cfg_batches_give_the_same_picture(single_engine):
    from leansd.engine.memory import SplitBatchUNet

    unet = single_engine.bundle.unet
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(4, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 4)}
    with torch.inference_mode():
        whole = unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]
        split = SplitBatchUNet(unet, 2)(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added)[0]
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_refiner_and_an_8_channel_sdxl_are_refused(files, tmp_path):
    from safetensors.torch import save_file

    from leansd.errors import UnsupportedModelError
    from leansd.models.checkpoint import read_state_dict

    sd = {k: v.clone() for k, v in read_state_dict(files["single"]).items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 8, 3, 3)  # instruct-pix2pix-shaped
    path = tmp_path / "xl-8-channel.safetensors"
    save_file(sd, str(path))
    with pytest.raises(UnsupportedModelError, match="could not recognise the model family"):
        load_model(path)
    refiner = {k: v for k, v in read_state_dict(files["single"]).items() if not k.startswith("conditioner.embedders.0.")}
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v.clone() for k, v in refiner.items()}
    path = tmp_path / "refiner.safetensors"
    save_file(refiner, str(path))
    with pytest.raises(UnsupportedModelError, match="recognised an SDXL refiner checkpoint"):
        load_model(path)


def _img_request(**kw) -> GenerationRequest:
    from tests.tiny.test_img2img_inpaint import init_image

    base = dict(prompt="a yellow square", negative_prompt="blurry", num_inference_steps=6, guidance_scale=7.5,
                seed=21, init_image=init_image())
    base.update(kw)
    return GenerationRequest(**base)


def _pipe(cls, engine: Engine, sampler: str, seeds: list[int]):
    b = engine.bundle
    pipe = cls(vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2, tokenizer=b.tokenizer,
               tokenizer_2=b.tokenizer_2, unet=b.unet,
               scheduler=build_scheduler(sampler, b.scheduler_config, seeds=seeds),
               force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
def test_img2img_matches_diffusers(single_engine, sampler):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    req = _img_request(sampler=sampler, strength=0.6, batch_size=2)
    ours = single_engine.generate(req, progress_bar=False)
    ref = _pipe(StableDiffusionXLImg2ImgPipeline, single_engine, sampler, ours.seeds)(
        prompt=req.prompt, negative_prompt=req.negative_prompt, image=req.init_image, strength=req.strength,
        num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
        num_images_per_prompt=2, generator=[torch.Generator("cpu").manual_seed(s) for s in ours.seeds],
        output_type="np",
    ).images
    assert np.abs(ours.pixels - ref).max() < 1e-4


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_legacy_inpaint_matches_diffusers(single_engine, strength):
    from diffusers import StableDiffusionXLInpaintPipeline

    from tests.tiny.test_img2img_inpaint import composite, square_mask

    req = _img_request(sampler="DDIM", strength=strength, mask=square_mask(), mask_blur=0).validated()
    ours = single_engine.generate(req, progress_bar=False)
    ref = _pipe(StableDiffusionXLInpaintPipeline, single_engine, req.sampler, ours.seeds)(
        prompt=req.prompt, negative_prompt=req.negative_prompt, image=req.init_image, mask_image=req.mask,
        strength=req.strength, num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
        height=SIZE, width=SIZE, generator=[torch.Generator("cpu").manual_seed(s) for s in ours.seeds],
        output_type="np",
    ).images
    np.testing.assert_allclose(ours.pixels, composite(ref, req.mask), atol=1e-4)


def test_cli_txt2img_on_an_sdxl_file(files, tmp_path):
    from PIL import Image

    from leansd.frontends.cli import main

    args = ["txt2img", "--ckpt", str(files["single"]), "--prompt", "a red fox", "--nprompt", "grey", "--sampler",
            "ddim", "--precision", "full", "--steps", "3", "--seed", "9", "--H", "64", "--W", "64", "--skip_grid",
            "--no-prompt-cache", "--outdir", str(tmp_path)]
    assert main(args) == 0
    image = np.asarray(Image.open(tmp_path / "seed_9_00000.png"))
    engine = Engine.load(str(files["single"]), device="cpu", precision="full", prompt_cache=False)
    req = GenerationRequest(prompt="a red fox", negative_prompt="grey", sampler="DDIM", num_inference_steps=3,
                            seed=9, width=64, height=64)
    expected = engine.generate(req, progress_bar=False)
    np.testing.assert_array_equal(image, np.asarray(expected.images[0]))
    ref = reference(engine, req.validated(), [9])
    assert np.abs(expected.pixels - ref).max() < 1e-4


def test_only_the_empty_negative_prompt_is_zeroed(single_engine, files):
    from leansd.pipelines.steps import PromptConditioning

    plan = PromptConditioning(single_engine, GenerationRequest(prompt="", negative_prompt="", width=SIZE,
                                                               height=SIZE)).plan(2)
    step = plan.at(0)
    assert torch.count_nonzero(step.uncond) == 0 and torch.count_nonzero(step.pooled_uncond) == 0
    assert torch.count_nonzero(step.conds[0]) == step.conds[0].numel()  # the empty prompt stays encoded
    assert torch.count_nonzero(step.pooled_conds[0]) > 0
    # SD 1.x / 2.x keep A1111's encoded empty negative prompt.
    assert not describe(ModelFamily.SD1).zero_empty_negative and not describe(ModelFamily.SD2).zero_empty_negative
    nonempty = PromptConditioning(single_engine, GenerationRequest(prompt="", negative_prompt=" ", width=SIZE,
                                                                   height=SIZE)).plan(2).at(0)
    assert torch.count_nonzero(nonempty.uncond) > 0
    # Prompt editing: the steps before the negative text starts are empty, hence zeros (A1111's scheduled text;
    # [:blurry:2] keeps the empty text through step 2, as A1111's schedule does).
    edited = PromptConditioning(single_engine, GenerationRequest(prompt="a fox", negative_prompt="[:blurry:2]",
                                                                 width=SIZE, height=SIZE)).plan(4)
    assert [bool(torch.count_nonzero(edited.at(i).uncond) == 0) for i in range(4)] == [True, True, True, False]
    assert [bool(torch.count_nonzero(edited.at(i).pooled_uncond) == 0) for i in range(4)] == [True, True, True, False]


def test_non_square_size_conditioning_matches_diffusers(single_engine):
    """original size = target size = (H, W): a non-square image tells the order apart."""
    from diffusers import StableDiffusionXLPipeline

    req = GenerationRequest(prompt="a red fox", negative_prompt="grey", width=96, height=64, num_inference_steps=3,
                            guidance_scale=7.5, sampler="Euler", seed=7)
    ours = single_engine.generate(req, progress_bar=False)
    b = single_engine.bundle
    pipe = StableDiffusionXLPipeline(
        vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2, tokenizer=b.tokenizer,
        tokenizer_2=b.tokenizer_2, unet=b.unet, scheduler=build_scheduler(req.sampler, b.scheduler_config, seeds=ours.seeds),
    )
    pipe.set_progress_bar_config(disable=True)

    def reference(**sizes):
        pipe.scheduler = build_scheduler(req.sampler, b.scheduler_config, seeds=ours.seeds)
        return pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, height=64, width=96, num_inference_steps=3,
                    guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(s) for s in ours.seeds],
                    output_type="np", **sizes).images

    ref = reference()
    assert ours.pixels.shape == ref.shape == (1, 64, 96, 3)
    assert np.abs(ours.pixels - ref).max() < 1e-4
    # The size conditioning is not inert on these weights: the (W, H) order gives another picture.
    swapped = reference(original_size=(96, 64), target_size=(96, 64))
    assert np.abs(swapped - ref).max() > 1e-3
