"""The A1111 layer both front ends share: no import circle, PIL uploads, sizes checked against the limits."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from leansd.errors import InvalidRequestError
from leansd.frontends import a1111

INIT = Image.new("RGB", (96, 72), (30, 120, 200))


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_the_web_ui_and_the_dialect_do_not_import_the_http_app() -> None:
    code = (
        "import sys; import leansd.frontends.webui, leansd.frontends.a1111; "
        "print('leansd.frontends.http' in sys.modules, 'fastapi' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_pil_uploads_make_the_same_request_as_base64() -> None:
    mask = Image.new("L", INIT.size, 0)
    mask.paste(255, (20, 20, 60, 50))
    body = a1111.Img2ImgRequest(prompt="a boat", seed=5, steps=4, denoising_strength=0.6)
    from_pil = a1111.img2img_request(body, model_name="tiny", limits=a1111.Limits(), init_image=INIT, mask=mask)
    encoded = body.model_copy(update={"init_images": [_b64(INIT)], "mask": _b64(mask)})
    from_b64 = a1111.img2img_request(encoded, model_name="tiny", limits=a1111.Limits())
    assert from_pil.init_image.tobytes() == from_b64.init_image.tobytes()
    assert from_pil.mask.tobytes() == from_b64.mask.tobytes()
    assert (from_pil.seed, from_pil.strength, from_pil.num_inference_steps) == (5, 0.6, 4)


def test_upload_errors_do_not_show_the_server_side_file_name(tmp_path) -> None:
    path = tmp_path / "upload-1234.png"
    path.write_bytes(b"not a picture")
    with pytest.raises(InvalidRequestError) as caught:
        a1111.load_upload(path, label="image")
    assert str(caught.value) == "image: is not an image in an accepted format (PNG, JPEG, WebP, BMP, TIFF, GIF (first frame))"
    with pytest.raises(InvalidRequestError, match=r"^init_images\[0\] is not valid base64$"):
        a1111.decode_base64_image("@@@", label="init_images[0]")


def test_an_uploaded_file_has_the_base64_uploads_byte_limit(tmp_path) -> None:
    path = tmp_path / "huge.png"
    with path.open("wb") as file:  # sparse: a PNG header, then zeros up to one byte over the limit
        file.write(base64.b64decode(_b64(INIT))[:16])
        file.truncate(a1111.MAX_BODY_IMAGE_BYTES + 1)
    with pytest.raises(InvalidRequestError) as caught:
        a1111.load_upload(path, label="image")
    assert str(caught.value) == "image: the image is larger than 64 MB"
    too_long = "A" * (a1111.MAX_BODY_IMAGE_BYTES * 4 // 3 + 8)
    with pytest.raises(InvalidRequestError, match=r"^init_images\[0\]: the image is larger than 64 MB$"):
        a1111.decode_base64_image(too_long, label="init_images[0]")


def test_sizes_left_out_are_checked_against_the_server_limits() -> None:
    small = a1111.Limits(max_size=64)
    # txt2img: the model's native size must fit.
    with pytest.raises(InvalidRequestError, match=r"^width must be at most 64 on this server, got 512 \(the model's"):
        a1111.txt2img_request(a1111.Txt2ImgRequest(prompt="x"), model_name="m", limits=small, native_size=(512, 512))
    ok = a1111.txt2img_request(a1111.Txt2ImgRequest(prompt="x"), model_name="m", limits=small, native_size=(64, 64))
    assert (ok.width, ok.height) == (None, None)
    # ... and so must its hires pass.
    with pytest.raises(InvalidRequestError, match="the hires pass would be 128x128"):
        a1111.txt2img_request(a1111.Txt2ImgRequest(prompt="x", enable_hr=True), model_name="m", limits=small,
                              native_size=(64, 64))
    # img2img: the init image's own size must fit.
    with pytest.raises(InvalidRequestError, match=r"^width must be at most 64 on this server, got 96 \(the init"):
        a1111.img2img_request(a1111.Img2ImgRequest(prompt="x"), model_name="m", limits=small, init_image=INIT)


def test_img2img_without_a_size_keeps_the_init_images_over_http(server) -> None:
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=120,
                        json={"prompt": "a boat", "init_images": [_b64(INIT)], "steps": 2, "seed": 1})
    assert answer.status_code == 200, answer.text
    with Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))) as image:
        assert image.size == INIT.size
