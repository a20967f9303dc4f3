"""The SDXL refiner over HTTP: A1111's refiner_checkpoint / refiner_switch_at fields on txt2img and img2img."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leansd.models.family import ModelFamily
from leansd.models.library import ModelLibrary
from leansd.outputs.infotext import parse_infotext

SIZE = 64


@pytest.fixture()
def library(tmp_path: Path) -> ModelLibrary:
    from leansd.models.tiny import write_tiny_single_file

    models = tmp_path / "models" / "Stable-diffusion"
    write_tiny_single_file(models / "xl-base.safetensors", family=ModelFamily.SDXL)
    write_tiny_single_file(models / "xl" / "xl-refiner.safetensors", family=ModelFamily.SDXL_REFINER)
    return ModelLibrary(data_dir=tmp_path)


def _image(payload: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(payload["images"][0])))


def test_refiner_fields_on_txt2img_and_img2img(library: ModelLibrary, live_server, monkeypatch, tmp_path) -> None:
    import requests

    from leansd import GenerationRequest
    from leansd.engine.engine import Engine
    from leansd.frontends.http import create_app
    from leansd.models.loader import load_model

    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "cache"))
    base = library.find_checkpoint("xl-base").path
    refiner = library.find_checkpoint("xl-refiner").path
    engine = Engine(load_model(base), device="cpu", precision="full", prompt_cache=False, library=library)
    server = live_server(create_app(engine, ui=False))
    url = f"{server.url}/sdapi/v1"
    body = {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 3, "width": SIZE, "height": SIZE,
            "steps": 5, "sampler_name": "Euler", "cfg_scale": 7.0}

    plain = requests.post(f"{url}/txt2img", json=body, timeout=300)
    refined = requests.post(f"{url}/txt2img", json={**body, "refiner_checkpoint": "xl-refiner [0123abcd89]",
                                                    "refiner_switch_at": 0.6}, timeout=300)
    assert plain.status_code == 200 and refined.status_code == 200, refined.text
    info = parse_infotext(_image(refined.json()).info["parameters"])
    assert info["Refiner"] == f"xl-refiner [{engine.refiner.bundle.hash}]" and info["Refiner switch at"] == "0.6"
    # The same request through the Python API gives the same picture.
    direct = Engine(load_model(base), device="cpu", precision="full", prompt_cache=False).generate(GenerationRequest(
        prompt="a red fox", negative_prompt="blurry", seed=3, width=SIZE, height=SIZE, num_inference_steps=5,
        sampler="Euler", guidance_scale=7.0, refiner_checkpoint=str(refiner), refiner_switch_at=0.6),
        progress_bar=False)
    np.testing.assert_array_equal(np.asarray(_image(refined.json())), np.asarray(direct.images[0]))
    assert np.abs(np.asarray(_image(plain.json()), dtype=int) - np.asarray(direct.images[0], dtype=int)).max() > 0
    # "None" is no refiner, as in A1111.
    none = requests.post(f"{url}/txt2img", json={**body, "refiner_checkpoint": "None"}, timeout=300)
    assert none.json()["images"][0] == plain.json()["images"][0]

    init = base64.b64encode(refined.content and _png(_image(refined.json()))).decode()
    img2img = requests.post(f"{url}/img2img", json={**body, "init_images": [init], "denoising_strength": 0.9,
                                                    "refiner_checkpoint": "xl/xl-refiner.safetensors"}, timeout=300)
    assert img2img.status_code == 200, img2img.text
    assert parse_infotext(_image(img2img.json()).info["parameters"])["Refiner switch at"] == "0.8"

    for bad, message in (({"refiner_checkpoint": "nothing-like-it"}, "refiner_checkpoint 'nothing-like-it' is not"),
                         ({"refiner_checkpoint": "xl-refiner", "refiner_switch_at": 1.5}, "refiner_switch_at"),
                         ({"refiner_checkpoint": "xl-refiner", "refiner_switch_at": 0}, "refiner_switch_at")):
        answer = requests.post(f"{url}/txt2img", json={**body, **bad}, timeout=60)
        assert answer.status_code in (400, 422) and message in answer.text, answer.text
    as_refiner = requests.post(f"{url}/txt2img", json={**body, "refiner_checkpoint": "xl-base"}, timeout=60)
    assert as_refiner.status_code in (400, 422, 500) and "not an SDXL refiner" in as_refiner.text


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
