"""The web UI's generate actions scripted with gradio_client, as a user would (api_name txt2img/img2img/inpaint)."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from leansd.outputs.infotext import parse_infotext
from leansd.outputs.writer import read_infotext

# prompt, negative, sampler, steps, cfg, width, height, batch count, batch size, seed
COMMON = ["a red fox", "blurry", "Euler a", 2, 7.0, 64, 72, 1, 2, 1234]


def _check(result, *, n: int, seed: int, steps: int, size: tuple[int, int]) -> list[dict]:
    gallery, infotext, files, progress = result
    assert len(gallery) == n and len(files) == n
    infos = []
    for k, item in enumerate(gallery):
        with Image.open(item["image"]) as image:
            image.load()
            assert image.size == size
        info = parse_infotext(item["caption"])
        assert info["Seed"] == str(seed + k)
        assert info["Steps"] == str(steps)
        assert info["Size"] == f"{size[0]}x{size[1]}"
        # The downloadable PNG carries the same parameters.
        assert read_infotext(__import__("pathlib").Path(files[k])) == item["caption"]
        infos.append(info)
    assert infotext.split("\n\n")[0] == gallery[0]["caption"]
    assert "image" in progress
    return infos


def test_api_names_are_scriptable(client) -> None:
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/txt2img", "/img2img", "/inpaint", "/png_info"} <= set(endpoints)


def test_txt2img(client) -> None:
    result = client.predict(*COMMON, api_name="/txt2img")
    infos = _check(result, n=2, seed=1234, steps=2, size=(64, 72))
    assert infos[0]["Prompt"] == "a red fox" and infos[0]["Negative prompt"] == "blurry"
    assert infos[0]["Sampler"] == "Euler a"


def test_img2img(client, tmp_path) -> None:
    from gradio_client import handle_file

    init = tmp_path / "init.png"
    Image.new("RGB", (80, 64), (200, 30, 30)).save(init)
    args = ["a blue fox", "", "DDIM", 4, 5.0, 64, 64, 1, 1, 77]
    result = client.predict(handle_file(str(init)), *args, 0.5, "just resize", api_name="/img2img")
    (info,) = _check(result, n=1, seed=77, steps=4, size=(64, 64))
    assert info["Denoising strength"] == "0.5"


def test_inpaint_with_uploaded_mask_and_with_painted_layer(client, tmp_path) -> None:
    from gradio_client import handle_file

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (30, 120, 30)).save(init)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    mask.save(tmp_path / "mask.png")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # a brush stroke: opaque where painted
    ImageDraw.Draw(layer).ellipse((10, 10, 40, 40), fill=(255, 255, 255, 255))
    layer.save(tmp_path / "layer.png")
    args = ["a cat", "", "Euler", 2, 7.0, 64, 64, 1, 1, 5]
    tail = [0.8, 4, "original", False]
    editor = {"background": handle_file(str(init)), "layers": [], "composite": handle_file(str(init))}
    result = client.predict(editor, handle_file(str(tmp_path / "mask.png")), *args, *tail, api_name="/inpaint")
    (info,) = _check(result, n=1, seed=5, steps=2, size=(64, 64))
    assert info["Mask blur"] == "4"
    painted = {"background": handle_file(str(init)), "layers": [handle_file(str(tmp_path / "layer.png"))],
               "composite": handle_file(str(init))}
    result = client.predict(painted, None, *args, 0.8, 0, "latent noise", True, api_name="/inpaint")
    _check(result, n=1, seed=5, steps=2, size=(64, 64))


def test_png_info_reads_back_a_result(client) -> None:
    from gradio_client import handle_file

    gallery, *_ = client.predict(*COMMON[:8], 1, 99, api_name="/txt2img")
    text, parsed = client.predict(handle_file(gallery[0]["image"]), api_name="/png_info")
    assert text == gallery[0]["caption"]
    assert parsed["Seed"] == "99" and parsed["Size"] == "64x72"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({5: 100}, "multiple of 8"),
        ({2: "No Such Sampler"}, "No Such Sampler"),
        ({3: 1000}, "maximum value 150"),  # the slider's own range check
        ({5: 4096}, "maximum value 512"),  # --max-size of the test server
    ],
)
def test_bad_values_give_readable_errors(client, change, message) -> None:
    from gradio_client.exceptions import AppError

    args = list(COMMON)
    for index, value in change.items():
        args[index] = value
    with pytest.raises(Exception) as caught:
        client.predict(*args, api_name="/txt2img")
    text = str(caught.value)
    assert message in text, text
    assert "Traceback" not in text
    if isinstance(caught.value, AppError):
        assert len(text.splitlines()) <= 2


def test_missing_image_is_a_readable_error(client) -> None:
    with pytest.raises(Exception, match="upload an image"):
        client.predict(None, *COMMON, 0.5, "just resize", api_name="/img2img")


def test_vram_budget_can_be_changed_from_the_settings_panel() -> None:
    from gradio_client import Client

    from leansd.engine.engine import Engine
    from leansd.frontends.http import create_app
    from tests.helpers import tiny_bundle
    from tests.service.conftest import LiveServer

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, vram=None, virtual_device=True)
    with LiveServer(create_app(engine, max_queue=4)) as server:
        client = Client(server.url + "/", verbose=False)
        shown = client.predict("300M", api_name="/set_vram")
        assert engine.budget == 300 * 2**20 and engine.memory.budget == engine.budget
        assert "300 MiB" in shown
        with pytest.raises(Exception, match="vram|size|budget") as caught:
            client.predict("lots", api_name="/set_vram")
        assert "Traceback" not in str(caught.value)
        assert engine.budget == 300 * 2**20  # a bad value changes nothing
        client.predict("none", api_name="/set_vram")
        assert engine.budget is None
