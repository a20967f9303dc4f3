"""SD 2.x on tiny random models: loading both formats, the prediction type, and equivalence with
diffusers' pipelines (fp32, CPU, 1e-4) for txt2img (v-prediction), img2img and inpainting."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from leansd import Engine, GenerationRequest
from leansd.models.checkpoint import read_state_dict
from leansd.models.convert import diffusers_to_ldm, penultimate_text_encoder
from leansd.models.families import OPEN_CLIP
from leansd.models.family import ModelFamily
from leansd.models.loader import load_model
from leansd.models.tiny import build_tiny_components, write_tiny_diffusers_folder, write_tiny_single_file
from leansd.sampling.samplers import build_scheduler
from tests.tiny.test_img2img_inpaint import SIZE, composite, init_image, square_mask

V_YAML = 'model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n'
EPS_YAML = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    linear_start: 0.00085\n"


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    single = write_tiny_single_file(root / "tiny-sd2-v.safetensors", family=ModelFamily.SD2)
    single.with_suffix(".yaml").write_text(V_YAML)
    return {
        "single": single,
        "folder": write_tiny_diffusers_folder(root / "tiny-sd2-v", family=ModelFamily.SD2),
        "inpaint": write_tiny_single_file(root / "tiny-sd2-inpaint.safetensors", family=ModelFamily.SD2,
                                          inpainting=True),
        "root": root,
    }


@pytest.fixture(scope="module")
def single_engine(files) -> Engine:
    return Engine(load_model(files["single"]), device="cpu", precision="full", prompt_cache=False)


@pytest.fixture(scope="module")
def folder_engine(files) -> Engine:
    return Engine(load_model(files["folder"]), device="cpu", precision="full", prompt_cache=False)


@pytest.fixture(scope="module")
def inpaint_engine(files) -> Engine:
    return Engine(load_model(files["inpaint"]), device="cpu", precision="full", prompt_cache=False)


# -- loading ---------------------------------------------------------------------------------------


def test_single_file_round_trip_every_tensor(files):
    sd = read_state_dict(files["single"])
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd
    assert "cond_stage_model.model.text_projection" in sd
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd)
    bundle = load_model(files["single"])
    written = diffusers_to_ldm(bundle.unet, bundle.vae, bundle.text_encoder, text_layout=OPEN_CLIP)
    assert set(written) == set(sd)
    for key, value in sd.items():
        assert torch.equal(written[key], value), key


def test_single_file_equals_the_in_process_models(files):
    bundle = load_model(files["single"])
    reference = build_tiny_components(seed=0, family=ModelFamily.SD2)
    for name in ("unet", "vae", "text_encoder"):
        loaded, expected = getattr(bundle, name).state_dict(), getattr(reference, name).state_dict()
        assert set(loaded) == set(expected), name
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), f"{name}.{key}"


def test_what_each_format_loads(files):
    single, folder = load_model(files["single"]), load_model(files["folder"])
    for bundle in (single, folder):
        assert bundle.family is ModelFamily.SD2
        assert bundle.prediction_type == "v_prediction"
        assert bundle.tokenizer.pad_token == "!" and bundle.tokenizer.pad_token_id == 0
        assert bundle.default_size == 64  # a narrow test model; full-size 768-v files get 768
        assert bundle.unet.config.use_linear_projection is True
        assert bundle.vae.config.scaling_factor == 0.18215
        assert bundle.scheduler_config["steps_offset"] == 1
    # The single file holds the whole OpenCLIP encoder and conditions on its penultimate layer; the
    # folder stores it cut after that layer (diffusers' convention) and uses its last hidden state.
    assert (single.text_layer, single.text_encoder.config.num_hidden_layers) == (-2, 3)
    assert (folder.text_layer, folder.text_encoder.config.num_hidden_layers) == (-1, 2)
    assert single.text_encoder.config.hidden_act == "gelu"


def test_penultimate_layer_of_the_file_equals_the_folders_last_layer(files):
    from leansd.prompts.encode import hidden_states

    single, folder = load_model(files["single"]), load_model(files["folder"])
    ids = torch.tensor([[49406, 320, 8853, 539, 550, 18376, 49407] + [0] * 70])
    with torch.inference_mode():
        penultimate = hidden_states(single.text_encoder, ids, layer=-2, final_norm=True)
        last = hidden_states(single.text_encoder, ids, layer=-1, final_norm=True)
        cut = hidden_states(folder.text_encoder, ids, layer=-1, final_norm=True)
    torch.testing.assert_close(penultimate, cut, rtol=0, atol=1e-6)
    assert (penultimate - last).abs().max() > 0.1  # the layer choice matters


def test_ddim_and_plms_keep_the_compvis_placement(single_engine):
    for sampler in ("DDIM", "PLMS"):
        scheduler = build_scheduler(sampler, single_engine.bundle.scheduler_config)
        scheduler.set_timesteps(50)
        assert scheduler.config.prediction_type == "v_prediction"
        assert int(scheduler.timesteps.min()) == 1 and int(scheduler.timesteps.max()) == 981


# -- prediction type ------------------------------------------------------------------------------


def _copy(files, tmp_path, name, yaml: str | None = None):
    import shutil

    target = tmp_path / name
    shutil.copy(files["single"], target)
    if yaml is not None:
        target.with_suffix(".yaml").write_text(yaml)
    return target


def test_yaml_beside_the_file_decides(files, tmp_path):
    assert load_model(_copy(files, tmp_path, "a.safetensors", V_YAML)).prediction_type == "v_prediction"
    assert load_model(_copy(files, tmp_path, "b.safetensors", EPS_YAML)).prediction_type == "epsilon"


def test_explicit_choice_wins_over_the_yaml(files, tmp_path):
    path = _copy(files, tmp_path, "c.safetensors", V_YAML)
    assert load_model(path, prediction_type="epsilon").prediction_type == "epsilon"
    assert load_model(files["folder"], prediction_type="epsilon").prediction_type == "epsilon"
    assert load_model(path, prediction_type="v").prediction_type == "v_prediction"


def test_bad_yaml_and_bad_choice_are_one_line_errors(files, tmp_path):
    from leansd.errors import InvalidRequestError, ModelLoadError

    path = _copy(files, tmp_path, "d.safetensors", "model: [unclosed\n")
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert str(info.value).startswith(f"{path.with_suffix('.yaml')}: not a valid YAML model config (")
    assert "\n" not in str(info.value)
    path = _copy(files, tmp_path, "e.safetensors", "model:\n  params:\n    parameterization: x0\n")
    with pytest.raises(ModelLoadError, match=r"parameterization 'x0' is not supported \(expected eps or v\)$"):
        load_model(path)
    with pytest.raises(InvalidRequestError, match="unknown prediction type 'sample'; valid: epsilon, v_prediction"):
        load_model(files["single"], prediction_type="sample")


@pytest.mark.parametrize(("text", "expected"), [
    ("model: foo\n", "epsilon"),  # a scalar where a mapping is expected: no parameterization
    ("model:\n  params: [1, 2]\n", "epsilon"),
    ("- just\n- a list\n", "epsilon"),
    ("[" * 100_000 + "\n", None),  # nesting deep enough to exhaust the parser's recursion
])
def test_odd_yaml_shapes_never_raise_anything_but_a_model_error(tmp_path, text, expected):
    from leansd.errors import ModelLoadError
    from leansd.models.prediction import prediction_from_yaml

    path = tmp_path / "odd.yaml"
    path.write_text(text)
    if expected is not None:
        assert prediction_from_yaml(path) == expected
        return
    with pytest.raises(ModelLoadError) as info:
        prediction_from_yaml(path)
    assert str(info.value).startswith(f"{path}: not a valid YAML model config (") and "\n" not in str(info.value)


def _with_keys(files, tmp_path, name, extra):
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in read_state_dict(files["single"]).items()}
    sd.update(extra)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_marker_keys(files, tmp_path):
    v = load_model(_with_keys(files, tmp_path, "v.safetensors", {"v_pred": torch.zeros(0)}))
    assert v.prediction_type == "v_prediction" and "rescale_betas_zero_snr" not in v.scheduler_config
    both = load_model(_with_keys(files, tmp_path, "vz.safetensors", {"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}))
    assert both.prediction_type == "v_prediction" and both.scheduler_config["rescale_betas_zero_snr"] is True
    scheduler = build_scheduler("Euler", both.scheduler_config)
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR: the last step is pure noise


@pytest.mark.parametrize(("bias", "expected"), [(-3.0, "v_prediction"), (0.0, "epsilon")])
def test_without_yaml_or_markers_the_unet_is_probed_and_the_choice_logged(files, tmp_path, caplog, bias, expected):
    # The probe runs the UNet on a constant 0.5 latent at t=999: v-prediction when mean(out - x) < -1.
    # Steering the output through conv_out's bias makes the expected answer known.
    sd = {k: v.clone() for k, v in read_state_dict(files["single"]).items()}
    sd["model.diffusion_model.out.2.weight"].zero_()
    sd["model.diffusion_model.out.2.bias"].fill_(bias)
    from safetensors.torch import save_file

    path = tmp_path / f"probe{bias}.safetensors"
    save_file(sd, str(path))
    with caplog.at_level(logging.WARNING, logger="leansd.models.loader"):
        bundle = load_model(path)
    assert bundle.prediction_type == expected
    assert f"assuming {expected} prediction for this SD 2.x model" in caplog.text
    assert f"mean output - input {bias - 0.5:.3g}" in caplog.text


def test_native_size_follows_the_prediction_type():
    from leansd.models.families import describe

    sd2 = describe(ModelFamily.SD2)
    assert (sd2.native_size_for("epsilon"), sd2.native_size_for("v_prediction")) == (512, 768)
    assert describe(ModelFamily.SD1).native_size_for("v_prediction") == 512


# -- equivalence with diffusers ---------------------------------------------------------------------


def diffusers_pipeline(cls, engine: Engine, sampler: str, seeds: list[int]):
    b = engine.bundle
    # diffusers' SD 2.x text encoder is the OpenCLIP encoder cut after its penultimate block.
    text_encoder = b.text_encoder if b.text_layer == -1 else penultimate_text_encoder(b.text_encoder)
    pipe = cls(
        vae=b.vae, text_encoder=text_encoder, tokenizer=b.tokenizer, unet=b.unet,
        scheduler=build_scheduler(sampler, b.scheduler_config, seeds=seeds),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def txt2img_reference(engine: Engine, request: GenerationRequest, seeds: list[int], **extra) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    return diffusers_pipeline(StableDiffusionPipeline, engine, request.sampler, seeds)(
        prompt=request.prompt, negative_prompt=request.negative_prompt or None, height=SIZE, width=SIZE,
        num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale, eta=request.eta,
        num_images_per_prompt=len(seeds), generator=generators(seeds), output_type="np", **extra,
    ).images


@pytest.mark.parametrize("source", ["single", "folder"])
@pytest.mark.parametrize("sampler", ["DDIM", "Euler a", "DPM++ 2M Karras"])
def test_v_prediction_txt2img_matches_diffusers(request, source: str, sampler: str) -> None:
    engine = request.getfixturevalue(f"{source}_engine")
    req = GenerationRequest(
        prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry, low quality",
        width=SIZE, height=SIZE, num_inference_steps=4, guidance_scale=7.5, sampler=sampler,
        eta=0.5 if sampler == "DDIM" else 0.0, seed=1234, batch_size=2,
    )
    ours = engine.generate(req, progress_bar=False)
    ref = txt2img_reference(engine, req, ours.seeds)
    assert ours.pixels.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours.pixels - ref).max() < 1e-4
    assert ref.std() > 0.05 and np.abs(ref[0] - ref[1]).max() > 0.05


def test_single_file_and_folder_make_the_same_images(single_engine, folder_engine):
    req = GenerationRequest(prompt="a red fox", width=SIZE, height=SIZE, num_inference_steps=3, sampler="Euler",
                            seed=5)
    a = single_engine.generate(req, progress_bar=False).pixels
    b = folder_engine.generate(req, progress_bar=False).pixels
    assert np.abs(a - b).max() < 1e-5


def test_guidance_rescale_matches_diffusers(folder_engine):
    req = GenerationRequest(prompt="a red fox", negative_prompt="grey", width=SIZE, height=SIZE,
                            num_inference_steps=4, guidance_scale=9.0, sampler="DDIM", seed=3, guidance_rescale=0.7)
    ours = folder_engine.generate(req, progress_bar=False)
    ref = txt2img_reference(folder_engine, req, ours.seeds, guidance_rescale=0.7)
    assert np.abs(ours.pixels - ref).max() < 1e-4
    plain = folder_engine.generate(GenerationRequest(**{**req.__dict__, "guidance_rescale": 0.0}), progress_bar=False)
    assert np.abs(plain.pixels - ours.pixels).max() > 1e-3  # the rescale changes the picture


def test_guidance_rescale_is_validated():
    from leansd.errors import InvalidRequestError

    assert GenerationRequest(prompt="x").guidance_rescale == 0.0
    with pytest.raises(InvalidRequestError, match="guidance_rescale must be between 0 and 1, got 1.5"):
        GenerationRequest(prompt="x", guidance_rescale=1.5).validated()


def img_request(**kw) -> GenerationRequest:
    base = dict(prompt="a yellow square", negative_prompt="blurry", num_inference_steps=6, guidance_scale=7.5,
                seed=21, init_image=init_image())
    base.update(kw)
    return GenerationRequest(**base)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
def test_v_prediction_img2img_matches_diffusers(single_engine, sampler: str) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    req = img_request(sampler=sampler, strength=0.6, batch_size=2)
    ours = single_engine.generate(req, progress_bar=False)
    ref = diffusers_pipeline(StableDiffusionImg2ImgPipeline, single_engine, sampler, ours.seeds)(
        prompt=req.prompt, negative_prompt=req.negative_prompt, image=req.init_image, strength=req.strength,
        num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
        num_images_per_prompt=2, generator=generators(ours.seeds), output_type="np",
    ).images
    assert np.abs(ours.pixels - ref).max() < 1e-4


def _inpaint_reference(engine: Engine, req: GenerationRequest, seeds: list[int]) -> np.ndarray:
    from diffusers import StableDiffusionInpaintPipeline

    return diffusers_pipeline(StableDiffusionInpaintPipeline, engine, req.sampler, seeds)(
        prompt=req.prompt, negative_prompt=req.negative_prompt, image=req.init_image, mask_image=req.mask,
        strength=req.strength, num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
        height=SIZE, width=SIZE, generator=generators(seeds), output_type="np",
    ).images


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_legacy_inpaint_matches_diffusers(folder_engine, strength: float) -> None:
    req = img_request(sampler="DDIM", strength=strength, mask=square_mask(), mask_blur=0).validated()
    ours = folder_engine.generate(req, progress_bar=False)
    ref = _inpaint_reference(folder_engine, req, ours.seeds)
    np.testing.assert_allclose(ours.pixels, composite(ref, req.mask), atol=1e-4)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
def test_nine_channel_inpaint_matches_diffusers(inpaint_engine, sampler: str) -> None:
    bundle = inpaint_engine.bundle
    assert bundle.family is ModelFamily.SD2_INPAINT and bundle.is_inpainting
    assert bundle.prediction_type == "epsilon"  # SD 2.x inpainting is not probed: it is epsilon
    req = img_request(sampler=sampler, strength=1.0, mask=square_mask(), mask_blur=0).validated()
    ours = inpaint_engine.generate(req, progress_bar=False)
    ref = _inpaint_reference(inpaint_engine, req, ours.seeds)
    np.testing.assert_allclose(ours.pixels, composite(ref, req.mask), atol=1e-4)


def test_truncated_sd2_file_is_a_one_line_error(files, tmp_path):
    from leansd.errors import ModelLoadError

    data = files["single"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: is truncated")
    assert "\n" not in str(info.value)


def test_cli_prediction_type_flag(files, tmp_path, capsys):
    from PIL import Image

    from leansd.frontends.cli import main

    path = tmp_path / "no-yaml.safetensors"
    path.write_bytes(files["single"].read_bytes())
    args = ["txt2img", "--ckpt", str(path), "--prompt", "a red fox", "--sampler", "DDIM", "--steps", "3",
            "--seed", "9", "--H", "64", "--W", "64", "--skip_grid", "--no-prompt-cache", "--guidance-rescale", "0.5"]
    assert main([*args, "--prediction-type", "v_prediction", "--outdir", str(tmp_path / "v")]) == 0
    assert main([*args, "--prediction-type", "epsilon", "--outdir", str(tmp_path / "eps")]) == 0
    v = np.asarray(Image.open(tmp_path / "v" / "seed_9_00000.png"))
    eps = np.asarray(Image.open(tmp_path / "eps" / "seed_9_00000.png"))
    engine = Engine.load(str(path), device="cpu", precision="full", prompt_cache=False, prediction_type="v_prediction")
    assert engine.bundle.prediction_type == "v_prediction"
    expected = engine.generate(GenerationRequest(prompt="a red fox", sampler="DDIM", num_inference_steps=3, seed=9,
                                                 width=64, height=64, guidance_rescale=0.5), progress_bar=False)
    np.testing.assert_array_equal(v, np.asarray(expected.images[0]))
    assert np.abs(v.astype(int) - eps.astype(int)).max() > 10  # the flag changes what the UNet output means


def test_ztsnr_model_warns_for_samplers_that_cannot_rescale(files, tmp_path, caplog):
    path = _with_keys(files, tmp_path, "z.safetensors", {"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})
    engine = Engine(load_model(path), device="cpu", precision="full", prompt_cache=False)
    req = dict(prompt="x", width=SIZE, height=SIZE, num_inference_steps=2, seed=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="leansd.pipelines.steps"):
        engine.generate(GenerationRequest(sampler="Euler", **req), progress_bar=False)
        assert "cannot rescale" not in caplog.text
        out = engine.generate(GenerationRequest(sampler="LMS", **req), progress_bar=False)
    assert "LMS cannot rescale its noise schedule to zero terminal SNR" in caplog.text
    assert np.isfinite(out.pixels).all()


def test_prompt_cache_keeps_the_layer_apart_and_hits_give_the_same_images(files, tmp_path):
    from leansd.prompts.cache import PromptCache

    cache = PromptCache(tmp_path / "prompts")
    engine = Engine(load_model(files["single"]), device="cpu", precision="full", prompt_cache=cache)
    assert engine.text_encoder_fingerprint().endswith("-layer-2")
    req = GenerationRequest(prompt="a red fox", width=SIZE, height=SIZE, num_inference_steps=2, sampler="Euler",
                            seed=4)
    first = engine.generate(req, progress_bar=False)
    again = engine.generate(req, progress_bar=False)
    assert first.info["text_encoder_used"] is True and again.info["text_encoder_used"] is False
    np.testing.assert_array_equal(first.pixels, again.pixels)


@pytest.mark.parametrize("policy", ["medvram", "lowvram"])
def test_memory_modes_give_the_same_picture(files, policy):
    from leansd.engine.planner import PlanRequest, plan_memory

    req = GenerationRequest(prompt="a red fox", negative_prompt="blurry", width=SIZE, height=SIZE,
                            num_inference_steps=3, sampler="Euler a", seed=5)
    resident = Engine(load_model(files["single"]), device="cpu", precision="full", prompt_cache=False)
    expected = resident.generate(req, progress_bar=False).pixels
    sizes = resident.sizes
    minimum = plan_memory(sizes, PlanRequest(width=SIZE, height=SIZE), None, policy=policy).minimum
    budget = int(minimum / 0.9) + 1
    constrained = Engine(load_model(files["single"]), device="cpu", precision="full", prompt_cache=False,
                         vram=budget, memory_policy=policy, virtual_device=True)
    out = constrained.generate(req, progress_bar=False)
    assert constrained.plan.placement in ("stages", "stream", "stream-layers")
    assert out.memory_peak_bytes <= budget
    np.testing.assert_allclose(out.pixels, expected, atol=1e-5)
