"""The OpenVINO backend gives torch's pictures: same weights, same seeds, both backends, compared.

Tolerances (fp32 IR, fp32 compute): UNet outputs within 1e-4 of torch's (measured ~2e-6 on
outputs of magnitude ~2); decoded pixels within 1/255 (float [0, 1]), so the saved 8-bit images
differ by at most one level where a value sits on a rounding edge (measured: ~0.001 of a level).
Every tiny part is converted once per shape into one cache folder for the module.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leansd import Engine, GenerationRequest
from leansd.backends.ir_cache import IRCache
from leansd.backends.openvino import OpenVinoBackend
from leansd.errors import InvalidRequestError
from leansd.models.family import ModelFamily
from leansd.models.library import ModelLibrary
from leansd.models.loader import load_model
from leansd.models.tiny import write_tiny_diffusers_folder, write_tiny_single_file
from leansd.request import StopGeneration
from tests.helpers import tiny_bundle, tiny_inpaint_bundle, tiny_kohya_lora
from tests.tiny.test_img2img_inpaint import init_image, square_mask

SIZE = 64
PIXEL_TOLERANCE = 1 / 255
"""Decoded float pixels in [0, 1]: at most one 8-bit level apart."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The module's conversions, where `IRCache()` looks with LEANSD_CACHE_DIR = its parent."""
    return tmp_path_factory.mktemp("leansd-cache") / "openvino"


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> ModelLibrary:
    root = tmp_path_factory.mktemp("data")
    (root / "models" / "Lora").mkdir(parents=True)
    save_file(tiny_kohya_lora(seed=1), str(root / "models" / "Lora" / "ink.safetensors"))
    return ModelLibrary(data_dir=root)


def pair(make_bundle, cache_dir, **options) -> tuple[Engine, Engine]:
    """A torch engine and an OpenVINO engine over two copies of the same weights."""
    torch_engine = Engine(make_bundle(), device="cpu", precision="full", prompt_cache=False, backend="torch", **options)
    ov_engine = Engine(make_bundle(), device="cpu", precision="full", prompt_cache=False,
                       backend=OpenVinoBackend(cache=IRCache(cache_dir)), **options)
    return torch_engine, ov_engine


@pytest.fixture(scope="module")
def sd1(cache_dir, library) -> tuple[Engine, Engine]:
    return pair(tiny_bundle, cache_dir, library=library)


@pytest.fixture(scope="module")
def sd1_inpaint(cache_dir) -> tuple[Engine, Engine]:
    return pair(tiny_inpaint_bundle, cache_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "sd2": write_tiny_diffusers_folder(root / "tiny-sd2-v", family=ModelFamily.SD2),  # v-prediction
        "sdxl": write_tiny_single_file(root / "tiny-sdxl.safetensors", family=ModelFamily.SDXL),
    }


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a red fox", negative_prompt="blurry", width=SIZE, height=SIZE, num_inference_steps=4,
                sampler="Euler a", seed=3, guidance_scale=7.5)
    base.update(kw)
    return GenerationRequest(**base)


def same_picture(engines: tuple[Engine, Engine], req: GenerationRequest) -> tuple[np.ndarray, np.ndarray]:
    reference, ours = (e.generate(req, progress_bar=False) for e in engines)
    assert reference.info["backend"] == "torch" and ours.info["backend"] == "openvino"
    assert np.abs(ours.pixels - reference.pixels).max() <= PIXEL_TOLERANCE
    eight_bit = [np.asarray(im, dtype=np.int16) for im in (*reference.images, *ours.images)]
    half = len(eight_bit) // 2
    for a, b in zip(eight_bit[:half], eight_bit[half:], strict=True):
        assert np.abs(a - b).max() <= 1
    return reference.pixels, ours.pixels


def test_unet_output_matches_torch_within_1e_4(sd1) -> None:
    torch_engine, ov_engine = sd1
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 77, 32), generator=g)
    t = torch.tensor(500)
    with torch.inference_mode():
        expected = torch_engine.bundle.unet(sample, t, encoder_hidden_states=context, return_dict=False)[0]
    with ov_engine.unet_stage(width=SIZE, height=SIZE, batch=1, passes=2) as unet:
        got = unet(sample, t, encoder_hidden_states=context, return_dict=False)[0]
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-4
    assert expected.abs().max() > 0.5  # not a trivially small output


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "Euler", "Euler a", "DPM++ 2M Karras", "DPM++ SDE Karras"])
def test_txt2img_every_sampler_family(sd1, sampler: str) -> None:
    same_picture(sd1, request(sampler=sampler, eta=0.5 if sampler == "DDIM" else 0.0))


def test_img2img(sd1) -> None:
    same_picture(sd1, request(init_image=init_image(), strength=0.6, sampler="DPM++ 2M Karras"))


def test_legacy_inpainting(sd1) -> None:
    same_picture(sd1, request(init_image=init_image(), mask=square_mask(), strength=0.8, sampler="DDIM"))


def test_nine_channel_inpainting(sd1_inpaint) -> None:
    same_picture(sd1_inpaint, request(init_image=init_image(), mask=square_mask(), strength=1.0))


def test_sd2_v_prediction(files, cache_dir) -> None:
    engines = pair(lambda: load_model(files["sd2"]), cache_dir)
    assert engines[0].bundle.prediction_type == "v_prediction"
    same_picture(engines, request(sampler="Euler"))


def test_sdxl_added_conditioning(files, cache_dir) -> None:
    engines = pair(lambda: load_model(files["sdxl"]), cache_dir)
    assert engines[0].bundle.family is ModelFamily.SDXL
    same_picture(engines, request(sampler="DPM++ 2M Karras"))


def test_seamless_tiling_is_converted_with_circular_padding(sd1) -> None:
    tiled, tiled_ov = same_picture(sd1, request(tiling=True))
    plain = sd1[1].generate(request(), progress_bar=False).pixels
    assert np.abs(tiled_ov - plain).max() > 0.05  # the circular padding is in the converted graph


def test_hires_fix_second_size(sd1) -> None:
    same_picture(sd1, request(hires_scale=1.5, hires_upscaler="latent", hires_strength=0.6))


def test_lora_is_in_the_converted_graph_and_the_key(sd1) -> None:
    before = sd1[1].backend.conversions  # type: ignore[attr-defined]
    with_lora, with_lora_ov = same_picture(sd1, request(prompt="a red fox <lora:ink:0.8>", sampler="DDIM"))
    plain_ov = sd1[1].generate(request(sampler="DDIM"), progress_bar=False).pixels
    assert np.abs(with_lora_ov - plain_ov).max() > 0.05  # the LoRA changes the picture, on OpenVINO too
    assert sd1[1].backend.conversions > before  # type: ignore[attr-defined]  # its own converted UNet


def test_infotext_records_the_backend(sd1) -> None:
    reference, ours = (e.generate(request(), progress_bar=False) for e in sd1)
    assert "Backend" not in reference.infotexts[0]
    assert ours.infotexts[0].endswith("Version: leansd 0.1.0") and "Backend: openvino" in ours.infotexts[0]


def test_a_second_engine_reuses_the_disk_cache_without_converting(tmp_path, caplog) -> None:
    cache = IRCache(tmp_path / "ir")
    first = Engine(tiny_bundle(), device="cpu", prompt_cache=False, backend=OpenVinoBackend(cache=cache))
    with caplog.at_level("WARNING", logger="leansd.backends.openvino"):
        a = first.generate(request(guidance_scale=1.0), progress_bar=False)  # batch 1: shapes no other test uses
    assert first.backend.conversions == 2  # type: ignore[attr-defined]  # the UNet and the VAE decoder
    assert "converting the unet for 1x4x8x8" in caplog.text and "converting the vae decoder" in caplog.text
    assert len(cache.entries()) == 2 and cache.total_bytes() > 0
    second = Engine(tiny_bundle(), device="cpu", prompt_cache=False, backend=OpenVinoBackend(cache=IRCache(tmp_path / "ir")))
    b = second.generate(request(guidance_scale=1.0), progress_bar=False)
    assert second.backend.conversions == 0  # type: ignore[attr-defined]
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_speed_is_measured_on_openvino_calls_without_a_new_conversion(sd1) -> None:
    _, engine = sd1
    engine.generate(request(num_inference_steps=1), progress_bar=False)  # the native CFG shape is converted
    before = engine.backend.conversions  # type: ignore[attr-defined]
    assert engine.calibrate_speed() > 0  # timed on the OpenVINO call (torch's hooks never see it)
    assert engine.backend.conversions == before  # type: ignore[attr-defined]
    assert engine.estimate(request()).seconds is not None


def test_interrupt_check_runs_before_every_step(sd1) -> None:
    _, engine = sd1
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise StopGeneration

    with engine.interruptible(check):
        result = engine.generate(request(), progress_bar=False)
    assert result.info.get("interrupted") is True and result.images == []
    assert len(calls) == 3


def test_auto_picks_openvino_only_when_converted_or_allowed(sd1, cache_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path))
    assert Engine(tiny_bundle(), device="cpu", prompt_cache=False).backend.name == "torch"  # nothing converted
    assert Engine(tiny_bundle(), device="cpu", prompt_cache=False, convert=True).backend.name == "openvino"
    sd1[1].generate(request(num_inference_steps=1), progress_bar=False)  # converted in the module's cache
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(cache_dir.parent))
    assert Engine(tiny_bundle(), device="cpu", prompt_cache=False).backend.name == "openvino"  # converted before
    other = tiny_bundle()
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)  # other weights: not converted
    assert Engine(other, device="cpu", prompt_cache=False).backend.name == "torch"
    # auto never picks OpenVINO where it cannot run: a reduced precision here.
    assert Engine(tiny_bundle(), device="cpu", precision="bf16", prompt_cache=False, convert=True).backend.name == "torch"


def test_openvino_refusals_are_one_line_errors() -> None:
    from leansd.backends import check_openvino_usable

    with pytest.raises(InvalidRequestError, match="CPU only"):
        check_openvino_usable(torch.device("cuda"), precision="fp16", budget=None, memory_policy="auto")
    with pytest.raises(InvalidRequestError, match="fp32"):
        Engine(tiny_bundle(), device="cpu", precision="bf16", backend="openvino")
    with pytest.raises(InvalidRequestError, match="memory budget"):
        Engine(tiny_bundle(), device="cpu", backend="openvino", vram="64M", virtual_device=True)
    with pytest.raises(InvalidRequestError, match="unknown backend 'onnx'; valid: auto, torch, openvino"):
        Engine(tiny_bundle(), device="cpu", backend="onnx")


def run_cli(*args: str, env: dict[str, str], prelude: str = "") -> "subprocess.CompletedProcess":
    code = f"import sys; {prelude}from leansd.frontends.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env})


def test_cli_auto_reuses_another_process_conversion(sd1, cache_dir, tmp_path) -> None:
    from leansd.outputs.infotext import parse_infotext
    from leansd.outputs.writer import read_infotext

    sd1[1].generate(request(num_inference_steps=1), progress_bar=False)  # converted at 64x64, CFG batch 2
    assert cache_dir.is_dir() and IRCache(cache_dir).entries()
    out = run_cli("txt2img", "--model", "tiny", "--prompt", "a red fox", "--steps", "2", "--seed", "5",
                  "--outdir", str(tmp_path / "out"), env={"LEANSD_CACHE_DIR": str(cache_dir.parent)})
    assert out.returncode == 0, out.stderr
    assert "converting" not in out.stderr  # auto chose OpenVINO (converted before) and converted nothing
    (png,) = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("seed_")]
    assert parse_infotext(read_infotext(png))["Backend"] == "openvino"


def test_cli_openvino_without_the_package_is_a_one_line_error(tmp_path) -> None:
    out = run_cli("txt2img", "--model", "tiny", "--prompt", "a fox", "--backend", "openvino",
                  "--outdir", str(tmp_path), env={}, prelude="sys.modules['openvino'] = None; ")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "leansd: error: the openvino backend needs the openvino package: pip install leansd[openvino]"
    ]
    assert not any(tmp_path.iterdir())


def test_cli_unknown_backend_exits_2() -> None:
    out = run_cli("txt2img", "--model", "tiny", "--prompt", "a fox", "--backend", "onnx", env={})
    assert out.returncode == 2 and "unknown backend 'onnx'; valid: auto, torch, openvino" in out.stderr


def unet_inputs(unet) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn((2, 4, 8, 8), generator=g), torch.tensor([500.0, 500.0]),
            torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)]


def test_the_compiled_unet_keeps_the_torch_weights_it_shares_alive(tmp_path) -> None:
    """The first compile uses the converted model, whose weights are the torch module's tensors:
    after the module is gone and its memory reused, the compiled UNet still computes the same."""
    import gc

    bundle = tiny_bundle()
    backend = OpenVinoBackend(cache=IRCache(tmp_path / "ir"))
    inputs = unet_inputs(bundle.unet)
    first = backend.run("unet", bundle.unet, inputs, patches="")
    with torch.inference_mode():
        expected = bundle.unet(*inputs[:2], encoder_hidden_states=inputs[2], return_dict=False)[0]
    assert (first - expected).abs().max() <= 1e-4
    compiled = backend.compiled("unet", bundle.unet, inputs, patches="")
    del bundle
    gc.collect()
    churn = [torch.full((256, 1024), 7.0) for _ in range(64)]  # reuse whatever memory was freed
    again = torch.from_numpy(compiled([t.numpy() for t in inputs])[0])
    del churn
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_fp16_stored_weights_compute_the_same_in_the_converting_and_a_later_process(tmp_path) -> None:
    bundle = tiny_bundle()
    inputs = unet_inputs(bundle.unet)
    converting = OpenVinoBackend(cache=IRCache(tmp_path / "ir"), weights="f16")
    first = converting.run("unet", bundle.unet, inputs, patches="")
    later = OpenVinoBackend(cache=IRCache(tmp_path / "ir"), weights="f16")
    second = later.run("unet", bundle.unet, inputs, patches="")
    assert (converting.conversions, later.conversions) == (1, 0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    with torch.inference_mode():
        expected = bundle.unet(*inputs[:2], encoder_hidden_states=inputs[2], return_dict=False)[0]
    error = (first - expected).abs().max().item()
    assert 0 < error <= 1e-2  # rounded to fp16 once, computed in fp32


def test_one_compiled_unet_is_kept_and_a_size_seen_before_compiles_again_without_converting(tmp_path, caplog) -> None:
    backend = OpenVinoBackend(cache=IRCache(tmp_path / "ir"))
    engine = Engine(tiny_bundle(), device="cpu", prompt_cache=False, backend=backend)
    first = engine.generate(request(num_inference_steps=2), progress_bar=False)
    engine.generate(request(num_inference_steps=2, width=2 * SIZE, height=2 * SIZE), progress_bar=False)
    assert len(backend._compiled["unet"]) == 1  # the other size's compiled UNet (its own weights copy) was dropped
    converted = backend.conversions
    with caplog.at_level("INFO", logger="leansd.backends.openvino"):
        again = engine.generate(request(num_inference_steps=2), progress_bar=False)
    assert backend.conversions == converted
    assert "compiled the unet for 2x4x8x8 from the converted model" in caplog.text  # not the mapped IR file
    np.testing.assert_array_equal(again.pixels, first.pixels)
    later = OpenVinoBackend(cache=IRCache(tmp_path / "ir"))  # another process: the disk cache
    with caplog.at_level("INFO", logger="leansd.backends.openvino"):
        from_disk = Engine(tiny_bundle(), device="cpu", prompt_cache=False, backend=later).generate(
            request(num_inference_steps=2), progress_bar=False)
    assert later.conversions == 0 and "compiled the unet for 2x4x8x8 from the disk cache" in caplog.text
    np.testing.assert_array_equal(from_disk.pixels, first.pixels)
