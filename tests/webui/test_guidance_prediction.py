"""guidance_rescale and the prediction type through the HTTP API and the web UI, over one live server.

guidance_rescale is a request field (diffusers' name; A1111 has none); the prediction type is a
model-load option that sits with the checkpoint choice: `/options` `prediction_type` and
`override_settings.prediction_type` ("Automatic", "epsilon", "v_prediction"). Every image is compared
with the same request run on a fresh in-process engine."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from leansd import Engine, GenerationRequest

PROMPT, SEED, STEPS = "a red fox", 11, 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from leansd.models.tiny import write_tiny_single_file

    return write_tiny_single_file(tmp_path_factory.mktemp("models") / "tiny.safetensors")


@pytest.fixture(scope="module")
def served(checkpoint):
    from gradio_client import Client

    from leansd.frontends.http import create_app
    from tests.service.conftest import LiveServer

    engine = Engine.load(str(checkpoint), device="cpu", precision="full", prompt_cache=False)
    server = LiveServer(create_app(engine, max_queue=8, max_size=512)).__enter__()
    yield engine, server, Client(server.url + "/", verbose=False, download_files=True)
    server.__exit__()


def expected(checkpoint, *, prediction_type: str | None = None, **fields) -> np.ndarray:
    engine = Engine.load(str(checkpoint), device="cpu", precision="full", prompt_cache=False,
                         prediction_type=prediction_type)
    request = GenerationRequest(PROMPT, sampler="Euler", num_inference_steps=STEPS, guidance_scale=9.0, width=64,
                                height=64, seed=SEED, **fields)
    return np.asarray(engine.generate(request, progress_bar=False).images[0].convert("RGB"))


def post(server, **body) -> tuple[np.ndarray, dict]:
    payload = dict(prompt=PROMPT, sampler_name="Euler", steps=STEPS, cfg_scale=9.0, width=64, height=64, seed=SEED)
    payload.update(body)
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=payload, timeout=120)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).convert("RGB")
    return np.asarray(image), json.loads(data["info"])


def ui_pixels(client, rescale: float) -> tuple[np.ndarray, str]:
    gallery, info, _files, _progress = client.predict(PROMPT, "", "Euler", STEPS, 9.0, 64, 64, 1, 1, SEED, rescale,
                                                      api_name="/txt2img")
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB")), info


def test_guidance_rescale_over_http_and_in_the_ui(served, checkpoint) -> None:
    engine, server, client = served
    plain, rescaled = expected(checkpoint), expected(checkpoint, guidance_rescale=0.7)
    assert np.abs(plain.astype(int) - rescaled.astype(int)).max() > 2  # the knob is not inert at CFG 9

    image, info = post(server, guidance_rescale=0.7)
    np.testing.assert_array_equal(image, rescaled)
    assert info["guidance_rescale"] == 0.7 and "CFG rescale: 0.7" in info["infotexts"][0]
    image, info = post(server)  # absent: the library's default, off
    np.testing.assert_array_equal(image, plain)
    assert info["guidance_rescale"] == 0.0 and "CFG rescale" not in info["infotexts"][0]

    pixels, infotext = ui_pixels(client, 0.7)
    np.testing.assert_array_equal(pixels, rescaled)
    assert "CFG rescale: 0.7" in infotext
    np.testing.assert_array_equal(ui_pixels(client, 0.0)[0], plain)


@pytest.mark.parametrize(("value", "status", "words"), [
    (1.5, 400, "guidance_rescale must be between 0 and 1, got 1.5"),
    (-0.1, 400, "guidance_rescale must be between 0 and 1, got -0.1"),
    ("lots", 422, "guidance_rescale"),
])
def test_a_bad_guidance_rescale_is_a_4xx_with_a_message(served, value, status, words) -> None:
    _engine, server, _client = served
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "guidance_rescale": value})
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"] and "\n" not in answer.json()["detail"]


def test_a_bad_guidance_rescale_in_the_ui_is_one_line(served) -> None:
    from gradio_client.exceptions import AppError

    _engine, _server, client = served
    with pytest.raises(AppError, match="greater than maximum value 1"):  # the slider's own bound
        client.predict(PROMPT, "", "Euler", STEPS, 9.0, 64, 64, 1, 1, SEED, 2.0, api_name="/txt2img")


def test_prediction_type_through_options_override_settings_and_the_ui(served, checkpoint) -> None:
    engine, server, client = served
    base = f"{server.url}/sdapi/v1"
    epsilon, v = expected(checkpoint), expected(checkpoint, prediction_type="v_prediction")
    assert np.abs(epsilon.astype(int) - v.astype(int)).max() > 2

    assert httpx.get(f"{base}/options").json()["prediction_type"] == "Automatic"
    image, info = post(server)
    np.testing.assert_array_equal(image, epsilon)
    assert "Prediction type" not in info["infotexts"][0]  # what the model says: nothing to record

    # Per request: override_settings (the checkpoint is reloaded with it, and it stays, as sd_model_checkpoint).
    image, info = post(server, override_settings={"prediction_type": "v"})
    np.testing.assert_array_equal(image, v)
    assert "Prediction type: v_prediction" in info["infotexts"][0]
    assert engine.prediction_choice == "v_prediction" and engine.bundle.prediction_type == "v_prediction"

    # The server option: back to what the model says, then forced again.
    assert httpx.post(f"{base}/options", json={"prediction_type": "Automatic"}).status_code == 200
    np.testing.assert_array_equal(post(server)[0], epsilon)
    assert engine.prediction_choice == "auto" and engine.bundle.prediction_type == "epsilon"
    assert httpx.post(f"{base}/options", json={"prediction_type": "v_prediction"}).status_code == 200
    assert httpx.get(f"{base}/options").json()["prediction_type"] == "v_prediction"
    np.testing.assert_array_equal(post(server)[0], v)

    # The web UI's dropdown sets the same option.
    assert client.predict("Automatic", api_name="/set_prediction_type") == "Prediction type: Automatic (from the next job)"
    assert httpx.get(f"{base}/options").json()["prediction_type"] == "Automatic"
    np.testing.assert_array_equal(ui_pixels(client, 0.0)[0], epsilon)
    assert engine.prediction_choice == "auto"


@pytest.mark.parametrize("where", ["options", "override_settings"])
def test_a_bad_prediction_type_is_a_400_and_changes_nothing(served, where) -> None:
    engine, server, _client = served
    base = f"{server.url}/sdapi/v1"
    before = httpx.get(f"{base}/options").json()["prediction_type"]
    if where == "options":
        answer = httpx.post(f"{base}/options", json={"prediction_type": "sample"})
        label = "prediction_type"
    else:
        answer = httpx.post(f"{base}/txt2img", json={"prompt": PROMPT, "override_settings": {"prediction_type": 3}})
        label = "override_settings.prediction_type"
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"] == (
        f"{label} must be Automatic, epsilon or v_prediction, got {'3' if where != 'options' else repr('sample')}")
    assert httpx.get(f"{base}/options").json()["prediction_type"] == before


def test_the_ui_refuses_an_unknown_prediction_type(served) -> None:
    from gradio_client.exceptions import AppError

    _engine, _server, client = served
    with pytest.raises(AppError):
        client.predict("x_prediction", api_name="/set_prediction_type")
