"""The real `webuiapi` client (PyPI) against a live server on the tiny model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from leansd.outputs.infotext import parse_infotext

from .conftest import SlowEngine

webuiapi = pytest.importorskip("webuiapi")


def client(server) -> "webuiapi.WebUIApi":
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)


def init_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (200, 120, 40))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(30, 60, 200))
    return image


def square_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    return mask


def test_txt2img_images_decode_and_metadata_parses(server) -> None:
    api = client(server)
    result = api.txt2img(prompt="a red fox in the snow", negative_prompt="blurry", seed=1234,
                         width=64, height=64, cfg_scale=7, batch_size=2)
    assert len(result.images) == 2
    assert all(im.size == (64, 64) for im in result.images)
    assert result.info["all_seeds"] == [1234, 1235] and result.info["seed"] == 1234
    assert result.info["sampler_name"] == "Euler a" and result.info["steps"] == 3
    for image, seed, infotext in zip(result.images, [1234, 1235], result.info["infotexts"], strict=True):
        meta = parse_infotext(image.info["parameters"])
        assert image.info["parameters"] == infotext
        assert meta["Prompt"] == "a red fox in the snow" and meta["Negative prompt"] == "blurry"
        assert meta["Seed"] == str(seed) and meta["Steps"] == "3" and meta["Sampler"] == "Euler a"
        assert meta["Size"] == "64x64"
    assert result.parameters["prompt"] == "a red fox in the snow"


def test_img2img_and_inpainting(server) -> None:
    api = client(server)
    source = init_image()
    result = api.img2img(images=[source], prompt="a blue ball", seed=7, width=64, height=64,
                         denoising_strength=0.6)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert parse_infotext(result.images[0].info["parameters"])["Seed"] == "7"

    mask = square_mask()
    painted = api.img2img(images=[source], mask_image=mask, prompt="a green cube", seed=8, width=64, height=64,
                          inpainting_fill=1, mask_blur=0, denoising_strength=1.0)
    out = np.asarray(painted.images[0].convert("RGB"), dtype=np.int16)
    keep = np.asarray(mask) == 0
    # Outside the (unblurred) mask the original pixels come back unchanged.
    assert np.abs(out[keep] - np.asarray(source, dtype=np.int16)[keep]).max() <= 1
    assert np.abs(out[~keep] - np.asarray(source, dtype=np.int16)[~keep]).mean() > 1
    inverted = api.img2img(images=[source], mask_image=mask, prompt="a green cube", seed=8, width=64, height=64,
                           inpainting_mask_invert=1, mask_blur=0, denoising_strength=1.0)
    out = np.asarray(inverted.images[0].convert("RGB"), dtype=np.int16)
    assert np.abs(out[~keep] - np.asarray(source, dtype=np.int16)[~keep]).max() <= 1


def test_options_models_samplers_and_lists(server) -> None:
    api = client(server)
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["tiny"]
    assert api.util_get_current_model() == models[0]["title"]
    assert api.set_options({"sd_model_checkpoint": models[0]["title"]}) is None
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M Karras", "DDIM", "PLMS", "UniPC"} <= set(names)
    assert "karras" in api.util_get_scheduler_names()
    assert api.get_loras() == [] and api.get_sd_vae() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert {u["name"] for u in api.get_upscalers()} >= {"None", "Lanczos"}
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0


def test_png_info_round_trip(server) -> None:
    api = client(server)
    image = api.txt2img(prompt="a lighthouse", seed=3, width=64, height=64).image
    info = api.png_info(image)
    assert info.info == image.info["parameters"]
    assert info.parameters["Seed"] == "3" and info.parameters["Prompt"] == "a lighthouse"


def test_progress_and_interrupt(engine, live_server) -> None:
    from leansd.frontends.http import create_app

    server = live_server(create_app(SlowEngine(engine, delay=0.05)))
    api = client(server)
    answer = {}

    def run() -> None:
        answer["result"] = api.txt2img(prompt="a slow fox", seed=11, width=64, height=64, steps=20, n_iter=4)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 30
    while True:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 1 and progress["state"]["job_count"] == 1:
            break
        assert time.monotonic() < deadline, progress
        time.sleep(0.02)
    # Wait into the second batch so one image is finished, then interrupt.
    while api.get_progress()["progress"] < 0.3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] >= 0
    api.interrupt()
    worker.join(30)
    result = answer["result"]
    assert 1 <= len(result.images) < 4
    assert result.info["interrupted"] is True
    assert result.info["all_seeds"] == list(range(11, 11 + len(result.images)))
    assert api.get_progress()["state"]["job_count"] == 0
