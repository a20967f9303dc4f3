"""Payloads modelled on AUTOMATIC1111's own API tests (64x64, 3 steps), plus the bad-input table."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image, ImageDraw

from .conftest import LiveServer


def b64(image: Image.Image, *, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


INIT = Image.new("RGB", (64, 64), (180, 90, 30))
ImageDraw.Draw(INIT).rectangle((8, 8, 40, 40), fill=(20, 140, 220))
MASK = Image.new("L", (64, 64), 0)
ImageDraw.Draw(MASK).ellipse((16, 16, 48, 48), fill=255)


@pytest.fixture(scope="module")
def base(engine):
    from leansd.frontends.http import create_app

    with LiveServer(create_app(engine, max_queue=32)) as server:
        yield server.url + "/sdapi/v1"


def txt2img(**overrides) -> dict:
    payload = {
        "prompt": "example prompt", "negative_prompt": "", "seed": -1, "batch_size": 1, "n_iter": 1,
        "steps": 3, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "tiling": False,
        "eta": 0, "sampler_index": "Euler a", "do_not_save_samples": True, "do_not_save_grid": True,
        "styles": [], "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1,
        "seed_resize_from_w": -1, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
        "override_settings": {}, "enable_hr": False, "denoising_strength": 0,
        "firstphase_width": 0, "firstphase_height": 0,
    }
    return {**payload, **overrides}


def img2img(**overrides) -> dict:
    payload = {
        "init_images": [b64(INIT)], "resize_mode": 0, "denoising_strength": 0.75, "mask": None,
        "mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": False, "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": False, "prompt": "example prompt", "styles": [], "seed": -1,
        "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
        "batch_size": 1, "n_iter": 1, "steps": 3, "cfg_scale": 7, "width": 64, "height": 64,
        "restore_faces": False, "tiling": False, "negative_prompt": "", "eta": 0, "s_churn": 0,
        "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {}, "sampler_index": "Euler a",
        "include_init_images": False,
    }
    return {**payload, **overrides}


TXT2IMG_CASES = {
    "simple": ({}, 1, (64, 64)),
    "negative prompt": ({"negative_prompt": "example negative prompt"}, 1, (64, 64)),
    "complex prompt": ({"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
                       1, (64, 64)),
    "not square": ({"width": 128, "height": 64}, 1, (128, 64)),
    "hires": ({"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}, 1, (128, 128)),
    "hires resize": ({"enable_hr": True, "hr_resize_x": 96, "hr_resize_y": 0, "hr_upscaler": "Lanczos",
                      "hr_second_pass_steps": 2, "denoising_strength": 0.5}, 1, (96, 96)),
    "tiling": ({"tiling": True}, 1, (64, 64)),
    "restore faces off": ({"restore_faces": False}, 1, (64, 64)),
    "n_iter 2": ({"n_iter": 2}, 2, (64, 64)),
    "batch 2": ({"batch_size": 2}, 2, (64, 64)),
    "PLMS": ({"sampler_index": "PLMS"}, 1, (64, 64)),
    "DDIM": ({"sampler_index": "DDIM"}, 1, (64, 64)),
    "UniPC": ({"sampler_index": "UniPC"}, 1, (64, 64)),
    "karras scheduler": ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, 1, (64, 64)),
    "unknown fields": ({"this_field_does_not_exist": 1, "alwayson_scripts": {}}, 1, (64, 64)),
}


def check_images(answer: httpx.Response, count: int, size: tuple[int, int]) -> dict:
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["images"]) == count
    for data in body["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.size == size and image.format == "PNG" and "parameters" in image.info
    info = json.loads(body["info"])
    assert len(info["all_seeds"]) == count and len(info["infotexts"]) == count
    return info


@pytest.mark.parametrize("case", list(TXT2IMG_CASES))
def test_txt2img_payloads(base, case) -> None:
    overrides, count, size = TXT2IMG_CASES[case]
    info = check_images(httpx.post(f"{base}/txt2img", json=txt2img(**overrides), timeout=120), count, size)
    if case == "karras scheduler":
        assert info["sampler_name"] == "DPM++ 2M Karras"


IMG2IMG_CASES = {
    "img2img": ({}, 1, (64, 64)),
    "data url": ({"init_images": [b64(INIT, data_url=True)]}, 1, (64, 64)),
    "inpaint": ({"mask": b64(MASK)}, 1, (64, 64)),
    "inpaint latent noise": ({"mask": b64(MASK), "inpainting_fill": 2}, 1, (64, 64)),
    "inpaint inverted": ({"mask": b64(MASK), "inpainting_mask_invert": True}, 1, (64, 64)),
    "crop resize, other size": ({"resize_mode": 1, "width": 96, "height": 64}, 1, (96, 64)),
    "batch 2": ({"batch_size": 2}, 2, (64, 64)),
}


@pytest.mark.parametrize("case", list(IMG2IMG_CASES))
def test_img2img_payloads(base, case) -> None:
    overrides, count, size = IMG2IMG_CASES[case]
    check_images(httpx.post(f"{base}/img2img", json=img2img(**overrides), timeout=120), count, size)


def test_send_images_false_and_parameters_do_not_echo_uploads(base) -> None:
    body = httpx.post(f"{base}/img2img", json=img2img(send_images=False, seed=4), timeout=60).json()
    assert body["images"] == []
    assert body["parameters"]["init_images"] is None and json.loads(body["info"])["seed"] == 4


BAD = {
    "width not multiple of 8": ("txt2img", {"width": 65}, 400, "multiple of 8"),
    "too large": ("txt2img", {"width": 8192}, 400, "at most 2048"),
    "too many steps": ("txt2img", {"steps": 100000}, 400, "steps"),
    "zero steps": ("txt2img", {"steps": 0}, 400, "steps"),
    "batch too large": ("txt2img", {"batch_size": 64, "n_iter": 64}, 400, "batch_size x n_iter"),
    "unknown sampler": ("txt2img", {"sampler_index": "Nope"}, 400, "valid samplers"),
    "unknown scheduler": ("txt2img", {"scheduler": "Exponential"}, 400, "scheduler"),
    "karras for Euler a": ("txt2img", {"scheduler": "Karras"}, 400, "not available"),
    "restore faces": ("txt2img", {"restore_faces": True}, 400, "restore_faces"),
    "script": ("txt2img", {"script_name": "x/y/z plot"}, 400, "script"),
    "extension": ("txt2img", {"alwayson_scripts": {"ControlNet": {"args": []}}}, 400, "ControlNet"),
    "styles": ("txt2img", {"styles": ["cinematic"]}, 400, "styles"),
    "variation seed": ("txt2img", {"subseed_strength": 0.5}, 400, "variation"),
    "other model": ("txt2img", {"override_settings": {"sd_model_checkpoint": "sdxl.safetensors"}}, 400, "model"),
    "unknown upscaler": ("txt2img", {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 400, "hr_upscaler"),
    "hires too large": ("txt2img", {"enable_hr": True, "hr_scale": 4, "width": 1024, "height": 1024}, 400, "hires"),
    "negative cfg": ("txt2img", {"cfg_scale": -1}, 400, "scale"),
    "seed too large": ("txt2img", {"seed": 2**40}, 400, "seed"),
    "wrong type": ("txt2img", {"steps": "many"}, 422, "steps"),
    "prompt not text": ("txt2img", {"prompt": {"a": 1}}, 422, "prompt"),
    "no init image": ("img2img", {"init_images": []}, 400, "init_images"),
    "two init images": ("img2img", {"init_images": [b64(INIT), b64(INIT)]}, 400, "one init image"),
    "bad base64": ("img2img", {"init_images": ["%%%not base64%%%"]}, 400, "base64"),
    "not an image": ("img2img", {"init_images": [base64.b64encode(b"hello world").decode()]}, 400, "not an image"),
    "truncated image": ("img2img", {"init_images": [b64(INIT)[:200]]}, 400, "init_images[0]"),
    "bad mask": ("img2img", {"mask": "????"}, 400, "mask"),
    "black mask": ("img2img", {"mask": b64(Image.new("L", (64, 64), 0))}, 400, "mask"),
    "mask aspect": ("img2img", {"mask": b64(Image.new("L", (64, 32), 255))}, 400, "mask"),
    "strength": ("img2img", {"denoising_strength": 1.5}, 400, "strength"),
    "inpainting fill": ("img2img", {"mask": b64(MASK), "inpainting_fill": 7}, 400, "inpainting_fill"),
    "resize mode": ("img2img", {"resize_mode": 9}, 400, "resize mode"),
    "mask blur": ("img2img", {"mask": b64(MASK), "mask_blur": 1000}, 400, "mask_blur"),
    "hires scale inf": ("txt2img", {"enable_hr": True, "hr_scale": 1e308}, 400, "hires_scale"),
    "hires one side too small": ("txt2img", {"enable_hr": True, "width": 2048, "height": 64, "hr_resize_x": 64},
                                 400, "hires pass would be"),
    "hires one side too large": ("txt2img", {"enable_hr": True, "width": 512, "height": 1024, "hr_resize_x": 2048},
                                 400, "hires pass would be"),
}


def test_nan_hires_scale_is_400(base) -> None:
    body = '{"prompt": "x", "steps": 2, "width": 64, "height": 64, "enable_hr": true, "hr_scale": NaN}'
    answer = httpx.post(f"{base}/txt2img", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code in (400, 422), answer.text
    assert "\n" not in answer.json()["detail"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_4xx_with_one_line(base, case) -> None:
    endpoint, overrides, status, words = BAD[case]
    payload = (txt2img if endpoint == "txt2img" else img2img)(**overrides)
    answer = httpx.post(f"{base}/{endpoint}", json=payload, timeout=60)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert words.lower() in body["detail"].lower(), body
    assert "\n" not in body["detail"] and body["error"]
    assert "/tmp" not in body["detail"]


def test_not_json_is_422(base) -> None:
    answer = httpx.post(f"{base}/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "\n" not in answer.json()["detail"]


def test_png_info_without_metadata_and_bad_image(base) -> None:
    plain = httpx.post(f"{base}/png-info", json={"image": b64(INIT)}).json()
    assert plain["info"] == "" and plain["parameters"] == {}
    assert httpx.post(f"{base}/png-info", json={"image": "nope!"}).status_code == 400
