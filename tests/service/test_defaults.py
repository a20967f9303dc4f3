"""One default per knob: the CLI, the HTTP API, the web UI and the Python API agree.

Each front end's default is read from the front end itself (argparse defaults, the A1111 schema
turned into a request the way the server does it, the web UI's component values), and compared
with a `GenerationRequest` built with nothing but a prompt. Sizes compare with what the library
makes of "no size": the model's native size (txt2img) or the init image's (img2img).
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Callable

import httpx
import pytest
from PIL import Image

from leansd.request import GenerationRequest

PROMPT = "a red fox in the snow"
RANDOM = "random"  # -1 and None both ask for a random seed


def _seed(value: Any) -> Any:
    return RANDOM if value in (None, -1) else value


def _b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


INIT = Image.new("RGB", (96, 80), (120, 60, 30))


# ---- the library --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library() -> GenerationRequest:
    return GenerationRequest(PROMPT)


# ---- the CLI: argparse defaults -------------------------------------------------------------


@pytest.fixture(scope="module")
def cli() -> dict[str, Any]:
    from leansd.frontends.cli import build_parser

    parser = build_parser()
    return {
        "txt2img": parser.parse_args(["txt2img", "--prompt", PROMPT]),
        "img2img": parser.parse_args(["img2img", "--prompt", PROMPT, "--init-img", "x.png"]),
        "inpaint": parser.parse_args(["inpaint", "--prompt", PROMPT, "--init-img", "x.png", "--mask", "m.png"]),
    }


# ---- the HTTP API: bodies with only a prompt (and an image), built as the server builds them ---


@pytest.fixture(scope="module")
def http(engine) -> dict[str, GenerationRequest]:
    from leansd.frontends import a1111

    limits = a1111.Limits()
    native = a1111.native_size(engine)
    init, mask = _b64_png(INIT), _b64_png(Image.new("L", INIT.size, 255))
    return {
        "txt2img": a1111.txt2img_request(a1111.Txt2ImgRequest(prompt=PROMPT), model_name="tiny", limits=limits,
                                         native_size=native),
        "hires": a1111.txt2img_request(a1111.Txt2ImgRequest(prompt=PROMPT, enable_hr=True), model_name="tiny",
                                       limits=limits, native_size=native),
        "img2img": a1111.img2img_request(a1111.Img2ImgRequest(prompt=PROMPT, init_images=[init]),
                                         model_name="tiny", limits=limits),
        "inpaint": a1111.img2img_request(a1111.Img2ImgRequest(prompt=PROMPT, init_images=[init], mask=mask),
                                         model_name="tiny", limits=limits),
        "schema_seed": a1111.Txt2ImgRequest(prompt=PROMPT).seed,
    }


# ---- the web UI: the values its controls start with ------------------------------------------


@pytest.fixture(scope="module")
def ui(engine) -> dict[str, Any]:
    from leansd.frontends.webui import build_ui
    from leansd.service.queue import JobQueue

    blocks = build_ui(JobQueue(engine), model_name="tiny")  # never started: only the controls are read
    return {b.elem_id: b.value for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def _ui_fill(label: str) -> str:
    from leansd.frontends.a1111 import INPAINTING_FILL
    from leansd.frontends.webui import MASKED_CONTENT

    return INPAINTING_FILL[MASKED_CONTENT[label]]


def _ui_resize(label: str) -> str:
    from leansd.frontends.webui import RESIZE_MODES
    from leansd.inputs.images import resize_mode_name

    return resize_mode_name(RESIZE_MODES.index(label))


def _ui_image_size(value: int) -> int | None:
    return None if value == 0 else value  # img2img/inpaint sliders: 0 keeps the init image's size


def _canonical_sampler(name: str) -> str:
    from leansd.sampling.samplers import get_sampler

    return get_sampler(name).name


# knob -> (library field, CLI, HTTP, web UI); None where a front end has no such control.
Getter = Callable[[dict], Any]
KNOBS: dict[str, tuple[str, Getter, Getter, "Getter | None"]] = {
    "sampler": ("sampler", lambda c: _canonical_sampler(c["txt2img"].sampler), lambda h: h["txt2img"].sampler,
                lambda u: [_canonical_sampler(u[f"{t}_sampler"]) for t in ("txt2img", "img2img", "inpaint")]),
    "steps": ("num_inference_steps", lambda c: c["txt2img"].steps, lambda h: h["txt2img"].num_inference_steps,
              lambda u: [u[f"{t}_steps"] for t in ("txt2img", "img2img", "inpaint")]),
    "cfg scale": ("guidance_scale", lambda c: c["txt2img"].scale, lambda h: h["txt2img"].guidance_scale,
                  lambda u: [u[f"{t}_cfg_scale"] for t in ("txt2img", "img2img", "inpaint")]),
    "seed": ("seed", lambda c: _seed(c["txt2img"].seed), lambda h: _seed(h["schema_seed"]),
             lambda u: [_seed(u[f"{t}_seed"]) for t in ("txt2img", "img2img", "inpaint")]),
    "batch size": ("batch_size", lambda c: c["txt2img"].n_samples, lambda h: h["txt2img"].batch_size,
                   lambda u: [u[f"{t}_batch_size"] for t in ("txt2img", "img2img", "inpaint")]),
    "batch count": ("n_iter", lambda c: c["txt2img"].n_iter, lambda h: h["txt2img"].n_iter,
                    lambda u: [u[f"{t}_batch_count"] for t in ("txt2img", "img2img", "inpaint")]),
    "eta": ("eta", lambda c: c["txt2img"].eta, lambda h: h["txt2img"].eta, None),
    "negative prompt": ("negative_prompt", lambda c: c["txt2img"].negative_prompt,
                        lambda h: h["txt2img"].negative_prompt,
                        lambda u: [u[f"{t}_negative_prompt"] or "" for t in ("txt2img", "img2img", "inpaint")]),
    "tiling": ("tiling", lambda c: c["txt2img"].tiling, lambda h: h["txt2img"].tiling, None),
    "prompt syntax": ("prompt_syntax", lambda c: c["txt2img"].prompt_syntax, lambda h: h["txt2img"].prompt_syntax,
                      None),
    "img2img width": ("width", lambda c: c["img2img"].width, lambda h: h["img2img"].width,
                      lambda u: [_ui_image_size(u[f"{t}_width"]) for t in ("img2img", "inpaint")]),
    "img2img height": ("height", lambda c: c["img2img"].height, lambda h: h["img2img"].height,
                       lambda u: [_ui_image_size(u[f"{t}_height"]) for t in ("img2img", "inpaint")]),
    "strength": ("strength", lambda c: c["img2img"].strength, lambda h: h["img2img"].strength,
                 lambda u: [u["img2img_denoising_strength"], u["inpaint_denoising_strength"]]),
    "resize mode": ("resize_mode", lambda c: c["img2img"].resize_mode, lambda h: h["img2img"].resize_mode,
                    lambda u: _ui_resize(u["img2img_resize_mode"])),
    "mask blur": ("mask_blur", lambda c: c["inpaint"].mask_blur, lambda h: h["inpaint"].mask_blur,
                  lambda u: u["inpaint_mask_blur"]),
    "inpainting fill": ("inpainting_fill", lambda c: c["inpaint"].inpainting_fill,
                        lambda h: h["inpaint"].inpainting_fill, lambda u: _ui_fill(u["inpaint_masked_content"])),
    "invert mask": ("invert_mask", lambda c: c["inpaint"].invert_mask, lambda h: h["inpaint"].invert_mask,
                    lambda u: u["inpaint_invert"]),
    "hires strength": ("hires_strength", lambda c: c["txt2img"].hires_strength, lambda h: h["hires"].hires_strength,
                       None),
    "hires upscaler": ("hires_upscaler", lambda c: c["txt2img"].hires_upscaler, lambda h: h["hires"].hires_upscaler,
                       None),
    "hires steps": ("hires_steps", lambda c: c["txt2img"].hires_steps, lambda h: h["hires"].hires_steps, None),
    "guidance rescale": ("guidance_rescale", lambda c: c["txt2img"].guidance_rescale,
                         lambda h: h["txt2img"].guidance_rescale,
                         lambda u: [u[f"{t}_guidance_rescale"] for t in ("txt2img", "img2img", "inpaint")]),
    # None: the loaded model keeps how its prediction type was chosen (CLI: what the model says).
    "prediction type": ("prediction_type", lambda c: c["txt2img"].prediction_type,
                        lambda h: h["txt2img"].prediction_type, None),
}


@pytest.mark.parametrize("knob", list(KNOBS))
def test_every_front_end_has_the_library_default(knob, library, cli, http, ui) -> None:
    field, from_cli, from_http, from_ui = KNOBS[knob]
    expected = getattr(library, field)
    if knob == "sampler":
        expected = _canonical_sampler(expected)
    if knob == "seed":
        expected = _seed(expected)
    assert from_cli(cli) == expected, f"CLI default of {knob}"
    assert from_http(http) == expected, f"HTTP API default of {knob}"
    if from_ui is not None:
        got = from_ui(ui)
        assert got == ([expected] * len(got) if isinstance(got, list) else expected), f"web UI default of {knob}"


def test_txt2img_size_defaults_to_the_models_native_size(engine, cli, http, ui) -> None:
    from leansd.frontends.a1111 import native_size

    image = engine.generate(GenerationRequest(PROMPT, num_inference_steps=1, seed=1), progress_bar=False).images[0]
    native = image.size  # what the library makes of "no size"
    assert native_size(engine) == native
    assert (cli["txt2img"].width, cli["txt2img"].height) == (None, None)
    assert (http["txt2img"].width, http["txt2img"].height) == (None, None)
    assert (ui["txt2img_width"], ui["txt2img_height"]) == native


def test_img2img_size_defaults_to_the_init_images(engine, http) -> None:
    # No width/height: the output keeps the init image's size (here already a multiple of 8).
    request = GenerationRequest(PROMPT, init_image=INIT, num_inference_steps=2, seed=3)
    assert engine.generate(request, progress_bar=False).images[0].size == INIT.size
    assert (http["img2img"].width, http["img2img"].height) == (None, None)


def test_a_request_with_only_a_prompt(engine, server) -> None:
    """Over HTTP, `{"prompt": ...}` alone makes what `GenerationRequest(prompt)` makes."""
    library = GenerationRequest(PROMPT, seed=42)
    expected = engine.generate(library, progress_bar=False)
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 42}, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    info = json.loads(body["info"])
    assert info["sampler_name"] == _canonical_sampler(library.sampler)
    assert info["steps"] == library.num_inference_steps
    assert info["cfg_scale"] == library.guidance_scale
    assert (info["width"], info["height"]) == expected.images[0].size
    assert info["all_seeds"] == list(expected.seeds)
    assert info["infotexts"] == list(expected.infotexts)
    with Image.open(io.BytesIO(base64.b64decode(body["images"][0]))) as image:
        assert image.convert("RGB").tobytes() == expected.images[0].convert("RGB").tobytes()
