"""SDXL base + refiner (ensemble of experts) on tiny random models equals diffusers' base+refiner pair:
``StableDiffusionXLPipeline(denoising_end=x, output_type="latent")`` then
``StableDiffusionXLImg2ImgPipeline(denoising_start=x)`` on the same weights and scheduler (fp32, CPU, 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.errors import InvalidRequestError, UnsupportedModelError
from leansd.models.family import ModelFamily
from leansd.models.loader import load_model
from leansd.models.tiny import write_tiny_diffusers_folder, write_tiny_single_file
from leansd.sampling.samplers import build_scheduler

SIZE = 64
PROMPT = "a photograph of an astronaut riding a horse"


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("refiner")
    return {
        "base": write_tiny_single_file(root / "tiny-sdxl.safetensors", family=ModelFamily.SDXL),
        "single": write_tiny_single_file(root / "tiny-refiner.safetensors", family=ModelFamily.SDXL_REFINER),
        "folder": write_tiny_diffusers_folder(root / "tiny-refiner", family=ModelFamily.SDXL_REFINER),
    }


def base_engine(files, **memory) -> Engine:
    return Engine(load_model(files["base"]), device="cpu", precision="full", prompt_cache=False, **memory)


def request_for(refiner, *, sampler="DDIM", negative="blurry, low quality", switch_at=0.8, steps=5, **extra):
    return GenerationRequest(prompt=PROMPT, negative_prompt=negative, width=SIZE, height=SIZE,
                             num_inference_steps=steps, guidance_scale=7.5, sampler=sampler, seed=1234, batch_size=2,
                             refiner_checkpoint=None if refiner is None else str(refiner),
                             refiner_switch_at=switch_at, **extra)


def reference(engine: Engine, req: GenerationRequest, seeds: list[int]) -> np.ndarray:
    """diffusers' ensemble of experts on the same modules, scheduler config and generators."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    b, r = engine.bundle, engine.refiner.bundle
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    common = dict(prompt=req.prompt, negative_prompt=req.negative_prompt or None,
                  num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale, eta=req.eta,
                  num_images_per_prompt=len(seeds), generator=generators)
    base = StableDiffusionXLPipeline(
        vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2, tokenizer=b.tokenizer,
        tokenizer_2=b.tokenizer_2, unet=b.unet, scheduler=build_scheduler(req.sampler, b.scheduler_config, seeds=seeds),
        force_zeros_for_empty_prompt=True,
    )
    base.set_progress_bar_config(disable=True)
    latents = base(height=SIZE, width=SIZE, denoising_end=req.refiner_switch_at, output_type="latent", **common).images
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=b.vae, text_encoder=None, text_encoder_2=r.text_encoder, tokenizer=None, tokenizer_2=r.tokenizer,
        unet=r.unet, scheduler=build_scheduler(req.sampler, r.scheduler_config, seeds=seeds),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=True,
    )
    refiner.set_progress_bar_config(disable=True)
    return refiner(image=latents, denoising_start=req.refiner_switch_at, output_type="np", **common).images


def test_what_loads_as_a_refiner(files):
    for kind in ("single", "folder"):
        bundle = load_model(files[kind], refiner=True)
        assert bundle.family is ModelFamily.SDXL_REFINER and bundle.description.refiner
        assert bundle.text_encoder_2 is None and bundle.text_encoder.config.projection_dim == 32
        assert bundle.tokenizer.pad_token == "!" and bundle.text_layer == -2
        assert bundle.unet.config.addition_embed_type == "text_time"
        assert bundle.unet.config.projection_class_embeddings_input_dim == 8 * 5 + 32
    single, folder = load_model(files["single"], refiner=True), load_model(files["folder"], refiner=True)
    for a, b in ((single.unet, folder.unet), (single.text_encoder, folder.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if "position_ids" not in k)


def test_refiner_and_base_are_not_interchangeable(files):
    for kind in ("single", "folder"):
        with pytest.raises(UnsupportedModelError, match="SDXL refiner checkpoint, which cannot be used as the base"):
            load_model(files[kind])
    with pytest.raises(UnsupportedModelError, match="recognised an SDXL checkpoint, not an SDXL refiner"):
        load_model(files["base"], refiner=True)
    sd1 = Engine.load("tiny", device="cpu", precision="full", prompt_cache=False)
    with pytest.raises(InvalidRequestError, match="a refiner runs after an SDXL base model"):
        sd1.set_refiner(str(files["single"]))


@pytest.mark.parametrize("source", ["single", "folder"])
@pytest.mark.parametrize(("sampler", "negative", "switch_at"), [
    ("DDIM", "blurry, low quality", 0.8), ("Euler", "", 0.8), ("Euler", "grey", 0.5), ("DDIM", "", 0.6),
])
def test_base_plus_refiner_matches_diffusers(files, source, sampler, negative, switch_at):
    engine = base_engine(files)
    req = request_for(files[source], sampler=sampler, negative=negative, switch_at=switch_at,
                      eta=0.5 if sampler == "DDIM" else 0.0)
    ours = engine.generate(req, progress_bar=False)
    ref = reference(engine, req, ours.seeds)
    assert ours.pixels.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours.pixels - ref).max() < 1e-4
    # The refiner changed the picture: the base alone gives another one (far beyond the tolerance above).
    alone = engine.generate(request_for(None, sampler=sampler, negative=negative, eta=req.eta), progress_bar=False)
    assert np.abs(alone.pixels - ours.pixels).max() > 1e-3
    name = files[source].stem if source == "single" else files[source].name
    info = ours.infotexts[0]
    assert f"Refiner: {name}" in info and f"Refiner switch at: {switch_at:g}" in info
    if source == "single":
        assert f"Refiner: {name} [{engine.refiner.bundle.hash}]" in info


def test_switch_at_one_is_the_base_alone(files):
    engine = base_engine(files)
    alone = engine.generate(request_for(None), progress_bar=False)
    at_one = engine.generate(request_for(files["single"], switch_at=1.0), progress_bar=False)
    np.testing.assert_array_equal(alone.pixels, at_one.pixels)
    assert "Refiner" not in at_one.infotexts[0]


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan")])
def test_switch_at_is_validated(value):
    with pytest.raises(InvalidRequestError, match="refiner_switch_at"):
        GenerationRequest(prompt="x", refiner_switch_at=value).validated()


def test_progress_counts_both_models_steps(files):
    engine = base_engine(files)
    steps: list[tuple[int, int]] = []
    engine.generate(request_for(files["single"], preview_every=0), progress=lambda e: steps.append(
        (e.step, e.total_steps)), progress_bar=False)
    assert steps == [(i, 5) for i in range(1, 6)] * 1


def test_img2img_and_inpaint_with_refiner(files):
    from PIL import Image

    engine = base_engine(files)
    image = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype("uint8"))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    for extra in ({"init_image": image, "strength": 0.9}, {"init_image": image, "mask": mask, "strength": 0.9}):
        with_refiner = engine.generate(request_for(files["single"], **extra), progress_bar=False)
        alone = engine.generate(request_for(None, **extra), progress_bar=False)
        assert np.isfinite(with_refiner.pixels).all()
        assert np.abs(with_refiner.pixels - alone.pixels).max() > 1e-3
        assert "Refiner switch at: 0.8" in with_refiner.infotexts[0]
    # Inpainting keeps the unmasked pixels whatever ran.
    out = engine.generate(request_for(files["single"], init_image=image, mask=mask, strength=0.9, mask_blur=0),
                          progress_bar=False)
    original = np.asarray(image, dtype=np.float32) / 255
    np.testing.assert_allclose(out.pixels[0][:8], original[:8], atol=1e-6)


@pytest.mark.parametrize("policy", ["medvram", "lowvram"])
def test_memory_modes_give_the_same_picture(files, policy):
    from leansd.engine.planner import PlanRequest, plan_memory

    req = request_for(files["single"], sampler="Euler a", steps=4)
    resident = base_engine(files)
    expected = resident.generate(req, progress_bar=False).pixels
    minimum = plan_memory(resident.sizes, PlanRequest(width=SIZE, height=SIZE, batch=2), None, policy=policy).minimum
    budget = int(minimum / 0.9) + 1
    constrained = base_engine(files, vram=budget, memory_policy=policy, virtual_device=True, efficient_attention=False)
    out = constrained.generate(req, progress_bar=False)
    refiner = constrained.refiner
    assert refiner is not None and refiner.budget == budget
    assert constrained.plan.placement in ("stages", "stream", "stream-layers")
    assert refiner.plan is not None and refiner.plan.placement in ("stages", "stream", "stream-layers")
    assert out.memory_peak_bytes <= budget and refiner.memory.peak <= budget
    assert not refiner._on_device  # the refiner left the device to the base's VAE
    np.testing.assert_allclose(out.pixels, expected, atol=1e-5)
    constrained.set_budget("none")  # one budget for both models
    assert constrained.budget is None and refiner.budget is None


def test_set_backend_reaches_a_loaded_refiner(files):
    pytest.importorskip("openvino")
    engine = base_engine(files)
    req = request_for(files["single"], switch_at=0.5, steps=2)
    on_torch = engine.generate(req, progress_bar=False)
    assert engine.refiner is not None and engine.refiner.backend.name == "torch"
    assert engine.set_backend("openvino") == "openvino"
    assert engine.refiner.backend.name == "openvino"
    on_openvino = engine.generate(req, progress_bar=False)
    assert engine.refiner.backend.conversions == 1  # type: ignore[attr-defined]  # its UNet ran on OpenVINO
    assert np.abs(on_openvino.pixels - on_torch.pixels).max() <= 1 / 255
    assert engine.set_backend("torch") == "torch" and engine.refiner.backend.name == "torch"
