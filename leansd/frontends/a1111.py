"""AUTOMATIC1111's `/sdapi/v1` dialect, in one place for every front end that speaks it.

The request schema (A1111's field names; unknown fields are ignored, as A1111 does), the server's
limits, the translation of a request body to a `GenerationRequest`, base64 image decoding and PNG
encoding, and the `info` JSON of a response. `leansd.frontends.http` serves these over FastAPI;
`leansd.frontends.webui` fills the same schema from its controls (passing uploaded images as PIL
images), so both front ends share one set of limits, checks and error messages.
Nothing here knows about HTTP: bad values raise `InvalidRequestError` with a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, ConfigDict

# leansd.request holds the library's defaults: one per knob, for every front end.
from leansd import __version__, request as defaults
from leansd.errors import InvalidRequestError, brief, is_out_of_memory, one_line
from leansd.frontends.limits import (
    DEFAULT_MAX_IMAGES as DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_SIZE as DEFAULT_MAX_SIZE,
    DEFAULT_MAX_STEPS as DEFAULT_MAX_STEPS,
    Limits,
)

if TYPE_CHECKING:
    from PIL import Image

    from leansd.request import GenerationRequest, GenerationResult
    from leansd.service.queue import JobQueue

logger = logging.getLogger(__name__)

API = "/sdapi/v1"
MAX_BODY_IMAGE_BYTES = 64 * 2**20

# A1111 `inpainting_fill` numbers -> ours.
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent-noise", 3: "latent-nothing"}
DEFAULT_INPAINTING_FILL = {name: number for number, name in INPAINTING_FILL.items()}[defaults.DEFAULT_INPAINTING_FILL]
DEFAULT_RESIZE_MODE = defaults.RESIZE_MODES.index(defaults.DEFAULT_RESIZE_MODE)  # A1111's resize_mode number
DEFAULT_HIRES_SCALE = 2.0
"""`hr_scale` when `enable_hr` gives no size (A1111's default; the library has no hires pass by default)."""
SCHEDULERS = (("automatic", "Automatic"), ("karras", "Karras"))
UPSCALERS = ("None", "Lanczos")
LATENT_UPSCALERS = ("Latent",)


# ---------------------------------------------------------------------------------------------
# Request schema: A1111's field names; unknown fields are ignored, as A1111 does. The defaults are
# the library's (leansd.request), not A1111's, so every front end has the same ones: sampler PLMS
# (A1111: Euler), cfg_scale 7.5 (7.0), inpainting_fill 1 = original (0 = fill), hires denoising
# strength 0.5 (0.75) and upscaler Lanczos (Latent); width/height None = the model's native size.


class A1111Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = -1
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0.0
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = defaults.DEFAULT_SAMPLER
    scheduler: Optional[str] = None
    batch_size: Optional[int] = defaults.DEFAULT_BATCH_SIZE
    n_iter: Optional[int] = defaults.DEFAULT_N_ITER
    steps: Optional[int] = defaults.DEFAULT_STEPS
    cfg_scale: Optional[float] = defaults.DEFAULT_GUIDANCE
    width: Optional[int] = None
    height: Optional[int] = None
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    eta: Optional[float] = defaults.DEFAULT_ETA
    guidance_rescale: Optional[float] = defaults.DEFAULT_GUIDANCE_RESCALE
    """Not an A1111 field (A1111 and Forge have no CFG rescale in their API): diffusers' name, as in the
    library and the CLI's --guidance-rescale. 0..1, 0 = off."""
    override_settings: Optional[dict[str, Any]] = None
    script_name: Optional[str] = None
    script_args: Optional[list[Any]] = None
    alwayson_scripts: Optional[dict[str, Any]] = None
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None


class Txt2ImgRequest(A1111Request):
    enable_hr: Optional[bool] = False
    denoising_strength: Optional[float] = defaults.DEFAULT_HIRES_STRENGTH
    hr_scale: Optional[float] = DEFAULT_HIRES_SCALE
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0


class Img2ImgRequest(A1111Request):
    init_images: Optional[list[str]] = None
    denoising_strength: Optional[float] = defaults.DEFAULT_STRENGTH
    mask: Optional[str] = None
    mask_blur: Optional[int] = None
    mask_blur_x: Optional[int] = defaults.DEFAULT_MASK_BLUR
    mask_blur_y: Optional[int] = defaults.DEFAULT_MASK_BLUR
    inpainting_fill: Optional[int] = DEFAULT_INPAINTING_FILL
    inpainting_mask_invert: Optional[int] = 0
    inpaint_full_res: Optional[bool] = True
    resize_mode: Optional[int] = DEFAULT_RESIZE_MODE
    include_init_images: Optional[bool] = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = ""


# ---------------------------------------------------------------------------------------------
# Images in and out


def decode_base64(data: object, *, label: str) -> bytes:
    """The bytes of a base64 field (with or without a `data:image/...;base64,` prefix)."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidRequestError(
            f"{label} must be a base64-encoded image, got {'an empty string' if data == '' else type(data).__name__}"
        )
    text = data.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidRequestError(f"{label}: a data URL must look like data:image/png;base64,<data>")
    if len(text) > MAX_BODY_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidRequestError(f"{label}: the image is larger than {MAX_BODY_IMAGE_BYTES // 2**20} MB")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{label} is not valid base64") from None


def load_upload(path: "str | os.PathLike[str]", *, label: str, mask: bool = False) -> "Image.Image":
    """An uploaded image file -> RGB (or an "L" mask), with exactly the CLI's checks.

    Goes through `load_image`/`load_mask` (decompression bombs, truncated files, EXIF rotation,
    transparency rules); the upload's file name, which means nothing to the client, is left out
    of error messages.
    """
    from leansd.inputs.images import load_image, load_mask

    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0  # a missing file: load_image says so
    if size > MAX_BODY_IMAGE_BYTES:  # the limit a base64 upload has, for the web UI's files too
        raise InvalidRequestError(f"{label}: the image is larger than {MAX_BODY_IMAGE_BYTES // 2**20} MB")
    try:
        return (load_mask if mask else load_image)(path, label=label)
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc).replace(f"{label} {os.fspath(path)}", label)) from None


def decode_base64_image(data: object, *, label: str, mask: bool = False) -> "Image.Image":
    """A base64 image (with or without a `data:image/...;base64,` prefix) -> RGB (or "L" mask).

    Decoded in memory with the CLI's checks and formats (`leansd.inputs.images.load_image_bytes`):
    nothing is written to disk, and messages name the field, never a path.
    """
    from leansd.inputs.images import load_image_bytes

    return load_image_bytes(decode_base64(data, label=label), label=label, mask=mask)


def encode_png(image: "Image.Image", infotext: str | None) -> str:
    """Base64 PNG with A1111's `parameters` text chunk."""
    from leansd.outputs.writer import write_png

    buffer = io.BytesIO()
    write_png(image, buffer, infotext=infotext)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_info(data: str) -> dict[str, Any]:
    """`/png-info`: the infotext of a base64 PNG, its other text chunks, and the parsed parameters."""
    from PIL import Image, UnidentifiedImageError

    from leansd.outputs.infotext import parse_infotext
    from leansd.outputs.writer import INFOTEXT_KEY

    if not data:
        raise InvalidRequestError("image is empty: send a base64-encoded PNG")
    from leansd.inputs.images import ACCEPTED_FORMATS, ACCEPTED_NAMES

    raw = decode_base64(data, label="image")
    try:
        with Image.open(io.BytesIO(raw), formats=list(ACCEPTED_FORMATS)) as image:
            items = {k: v for k, v in image.info.items() if isinstance(v, (str, int, float))}
    except UnidentifiedImageError:
        raise InvalidRequestError(f"image is not an image in an accepted format ({ACCEPTED_NAMES})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise InvalidRequestError(f"image cannot be read ({one_line(exc, limit=120)})") from None
    info = items.pop(INFOTEXT_KEY, None)
    if not isinstance(info, str):
        return {"info": "", "items": items, "parameters": {}}
    return {"info": info, "items": items, "parameters": parse_infotext(info)}


# ---------------------------------------------------------------------------------------------
# A1111 fields -> GenerationRequest


def sampler_from(sampler: str | None, scheduler: str | None) -> str:
    """A1111 sampler name plus `scheduler` ("Automatic", "Karras") -> our canonical sampler name."""
    from leansd.sampling.samplers import get_sampler, sampler_names

    spec = get_sampler(sampler or defaults.DEFAULT_SAMPLER)
    key = (scheduler or "automatic").strip().lower()
    if key in ("automatic", "", "default"):
        return spec.name
    if key != "karras":
        raise InvalidRequestError(
            f"unknown scheduler {scheduler!r}; valid: {', '.join(label for _, label in SCHEDULERS)}"
        )
    if spec.name.endswith(" Karras"):
        return spec.name
    karras = f"{spec.name} Karras"
    if karras not in sampler_names():
        with_karras = [n[: -len(' Karras')] for n in sampler_names() if n.endswith(" Karras")]
        raise InvalidRequestError(
            f"scheduler 'Karras' is not available for sampler {spec.name!r}; it is for: {', '.join(with_karras)}"
        )
    return karras


def unsupported(body: A1111Request) -> None:
    """Features leansd does not have: a 400 that names them, never silence."""
    if body.restore_faces:
        raise InvalidRequestError("restore_faces (face restoration) is not supported by leansd; send restore_faces: false")
    if body.script_name:
        raise InvalidRequestError(f"scripts are not supported by leansd (script_name {body.script_name!r}); leave script_name empty")
    if body.alwayson_scripts:
        names = ", ".join(sorted(map(str, body.alwayson_scripts)))
        raise InvalidRequestError(f"extension scripts are not supported by leansd (alwayson_scripts: {names})")
    if body.styles:
        raise InvalidRequestError("prompt styles are not supported by leansd; send the full prompt instead of styles")
    if body.subseed_strength:
        raise InvalidRequestError("variation seeds (subseed_strength > 0) are not supported by leansd")


def native_size(engine: Any) -> tuple[int, int] | None:
    """The loaded model's native (width, height): what a request without a size gets.

    The library's own rule (`leansd.pipelines.steps.resolve_size`); None for an engine that
    describes no model (a test double).
    """
    if getattr(engine, "bundle", None) is None:
        return None
    from leansd.pipelines.steps import resolve_size
    from leansd.request import GenerationRequest

    return resolve_size(engine, GenerationRequest(""))


def _check_size(limits: Limits, width: int | None, height: int | None, *, why: str = "") -> None:
    for name, value in (("width", width), ("height", height)):
        if value is not None and value > limits.max_size:
            raise InvalidRequestError(f"{name} must be at most {limits.max_size} on this server, got {value}{why}")


def _common_fields(body: A1111Request, *, model_name: str, limits: Limits, library: Any = None) -> dict[str, Any]:
    unsupported(body)
    overrides = body.override_settings or {}
    checkpoint = overrides.get("sd_model_checkpoint")
    switch: dict[str, Any] = {}
    if checkpoint and not same_model(str(checkpoint), model_name):
        if library is None or library.find_checkpoint(str(checkpoint)) is None:
            raise InvalidRequestError(
                f"override_settings.sd_model_checkpoint {checkpoint!r} is neither the loaded model {model_name!r} "
                "nor a checkpoint of the model folder (--ckpt-dir)"
            )
        switch["checkpoint"] = str(checkpoint)  # the job loads it before it starts
    if overrides.get("sd_vae") is not None:
        switch["vae"] = check_vae_option(overrides["sd_vae"], library=library, label="override_settings.sd_vae")
    switch.update(refiner_fields(body, library=library))
    if overrides.get(PREDICTION_OPTION) is not None:
        switch["prediction_type"] = check_prediction_option(overrides[PREDICTION_OPTION],
                                                            label=f"override_settings.{PREDICTION_OPTION}")
    width, height = body.width, body.height  # None: the library's default (the model's native size)
    steps = defaults.DEFAULT_STEPS if body.steps is None else body.steps
    batch_size = defaults.DEFAULT_BATCH_SIZE if body.batch_size is None else body.batch_size
    n_iter = defaults.DEFAULT_N_ITER if body.n_iter is None else body.n_iter
    _check_size(limits, width, height)
    if steps > limits.max_steps:
        raise InvalidRequestError(f"steps must be at most {limits.max_steps} on this server, got {steps}")
    if batch_size >= 1 and n_iter >= 1 and batch_size * n_iter > limits.max_images:
        raise InvalidRequestError(
            f"batch_size x n_iter must be at most {limits.max_images} images on this server, "
            f"got {batch_size} x {n_iter}"
        )
    return dict(
        prompt="" if body.prompt is None else body.prompt,
        negative_prompt=body.negative_prompt or "",
        seed=-1 if body.seed is None else body.seed,
        sampler=sampler_from(body.sampler_name or body.sampler_index, body.scheduler),
        batch_size=batch_size,
        n_iter=n_iter,
        num_inference_steps=steps,
        guidance_scale=defaults.DEFAULT_GUIDANCE if body.cfg_scale is None else body.cfg_scale,
        width=width,
        height=height,
        tiling=bool(body.tiling),
        eta=defaults.DEFAULT_ETA if body.eta is None else body.eta,
        guidance_rescale=defaults.DEFAULT_GUIDANCE_RESCALE if body.guidance_rescale is None else body.guidance_rescale,
        **switch,
    )


NO_REFINER = (None, "", "None", "none")
"""What A1111 reads as "no refiner" in refiner_checkpoint."""


def refiner_fields(body: A1111Request, *, library: Any = None) -> dict[str, Any]:
    """`refiner_checkpoint` (a checkpoint of the library by name or A1111 title, as sd_model_checkpoint) and
    `refiner_switch_at` (default: the library's 0.8) -> GenerationRequest fields; {} without a refiner."""
    name = body.refiner_checkpoint
    if name in NO_REFINER:
        return {}
    entry = None if library is None else library.find_checkpoint(str(name))
    if entry is None:
        raise InvalidRequestError(f"refiner_checkpoint {brief(name)} is not a checkpoint of the model folder "
                                  "(--ckpt-dir); send its name or title as listed by /sdapi/v1/sd-models, or None")
    switch_at = defaults.DEFAULT_REFINER_SWITCH_AT if body.refiner_switch_at is None else body.refiner_switch_at
    return {"refiner_checkpoint": str(entry.path), "refiner_switch_at": switch_at}


def txt2img_request(body: Txt2ImgRequest, *, model_name: str, limits: Limits,
                    native_size: tuple[int, int] | None = None, library: Any = None) -> "GenerationRequest":
    """A txt2img body -> a validated request; `native_size` (see `native_size()`) sizes the hires check."""
    from leansd.request import GenerationRequest

    fields = _common_fields(body, model_name=model_name, limits=limits, library=library)
    if native_size is not None:
        _check_size(limits, None if body.width is not None else native_size[0],
                    None if body.height is not None else native_size[1], why=" (the model's native size)")
    if body.enable_hr:
        upscaler = body.hr_upscaler or defaults.DEFAULT_HIRES_UPSCALER
        if upscaler.lower().startswith("latent"):
            fields["hires_upscaler"] = "latent"
        elif upscaler.lower() in ("none", "lanczos"):
            fields["hires_upscaler"] = "lanczos"  # A1111's "None" upscaler resizes with Lanczos too
        else:
            raise InvalidRequestError(
                f"hr_upscaler {upscaler!r} is not available; valid: {', '.join(LATENT_UPSCALERS + UPSCALERS)} "
                "(names starting with 'Latent' use the latent upscaler)"
            )
        rx, ry = body.hr_resize_x or 0, body.hr_resize_y or 0
        if rx or ry:
            fields["hires_width"] = rx or None
            fields["hires_height"] = ry or None
        else:
            fields["hires_scale"] = DEFAULT_HIRES_SCALE if body.hr_scale is None else body.hr_scale
        fields["hires_steps"] = body.hr_second_pass_steps or None
        fields["hires_strength"] = (defaults.DEFAULT_HIRES_STRENGTH if body.denoising_strength is None
                                    else body.denoising_strength)
    request = GenerationRequest(**fields).validated()  # checks hires_scale is finite and in range first
    native = native_size or (0, 0)
    first_pass = (request.width or native[0], request.height or native[1])
    if request.hires and all(first_pass):
        from leansd.pipelines.txt2img import hires_target

        target = hires_target(request, width=first_pass[0], height=first_pass[1])
        if target is not None and max(target) > limits.max_size:
            raise InvalidRequestError(
                f"the hires pass would be {target[0]}x{target[1]}; the largest side allowed on this server "
                f"is {limits.max_size}"
            )
    return request


def img2img_request(
    body: Img2ImgRequest,
    *,
    model_name: str,
    limits: Limits,
    init_image: "Image.Image | None" = None,
    mask: "Image.Image | None" = None,
    library: Any = None,
) -> "GenerationRequest":
    """An img2img/inpaint body -> a validated request.

    The images come from `init_images[0]` and `mask` (base64), or, from a front end that has
    them already (the web UI), as PIL images in `init_image` and `mask`. Without width/height the
    output keeps the init image's size (rounded down to 8), as in the library.
    """
    from leansd.inputs.images import resize_mode_name, target_size
    from leansd.request import GenerationRequest

    fields = _common_fields(body, model_name=model_name, limits=limits, library=library)
    images = body.init_images or []
    if init_image is None:
        if not images:
            raise InvalidRequestError("init_images must hold one base64-encoded image")
        if len(images) > 1:
            raise InvalidRequestError(
                f"init_images holds {len(images)} images; leansd takes one init image per request"
            )
    fill = DEFAULT_INPAINTING_FILL if body.inpainting_fill is None else body.inpainting_fill
    if fill not in INPAINTING_FILL:
        raise InvalidRequestError(
            f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), got {fill}"
        )
    blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
    fields.update(
        init_image=init_image if init_image is not None else decode_base64_image(images[0], label="init_images[0]"),
        strength=defaults.DEFAULT_STRENGTH if body.denoising_strength is None else body.denoising_strength,
        resize_mode=resize_mode_name(DEFAULT_RESIZE_MODE if body.resize_mode is None else body.resize_mode),
        mask_blur=defaults.DEFAULT_MASK_BLUR if blur is None else blur,
        inpainting_fill=INPAINTING_FILL[fill],
        invert_mask=bool(body.inpainting_mask_invert),
    )
    if fields["width"] is None or fields["height"] is None:
        # Without a size the library keeps the init image's (rounded down to 8): it must fit the limits too.
        width, height = target_size(fields["init_image"].size, width=fields["width"], height=fields["height"])
        _check_size(limits, width, height, why=" (the init image's size; give width and height to resize it)")
    if mask is not None:
        fields["mask"] = mask
    elif body.mask:
        fields["mask"] = decode_base64_image(body.mask, label="mask", mask=True)
    return GenerationRequest(**fields).validated()


def same_model(name: str, model_name: str) -> bool:
    def key(text: str) -> str:
        text = text.split(" [")[0].strip()  # A1111 titles are "name.safetensors [hash]"
        return os.path.splitext(os.path.basename(text))[0].lower()

    return key(name) == key(model_name)


# ---------------------------------------------------------------------------------------------
# Responses


def info_json(request: "GenerationRequest", result: "GenerationResult", *, model_name: str,
              model_hash: str | None, job_timestamp: str, interrupted: bool) -> str:
    """A1111's `info` string: JSON with the first seed, all seeds, infotexts, sizes, ..."""
    seeds = list(result.seeds)
    first_seed = seeds[0] if seeds else request.seed
    n = len(seeds)
    width, height = result.images[0].size if result.images else (request.width, request.height)
    info = {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * n,
        "seed": first_seed,
        "all_seeds": seeds,
        "subseed": first_seed,
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": request.sampler,
        "cfg_scale": request.guidance_scale,
        "steps": request.num_inference_steps,
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": (
            request.strength if request.init_image is not None
            else request.hires_strength if request.hires else None
        ),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": list(result.infotexts),
        "styles": [],
        "job_timestamp": job_timestamp,
        "clip_skip": 1,
        "is_using_inpainting_conditioning": request.mask is not None,
        "guidance_rescale": request.guidance_rescale,
        "version": f"leansd {__version__}",
        "interrupted": interrupted,
        "timings": result.timings,
    }
    return json.dumps(info)


def model_title(name: str, model_hash: str | None) -> str:
    """A1111's checkpoint title: `name [hash]`."""
    return f"{name} [{model_hash}]" if model_hash else name


def response(body: A1111Request, request: "GenerationRequest", result: "GenerationResult", *, images: list[str],
             model_name: str, model_hash: str | None, job_timestamp: str, interrupted: bool) -> dict[str, Any]:
    """A1111's txt2img/img2img answer: base64 images, the request's parameters, the `info` JSON."""
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest):
        parameters["init_images"] = None  # as A1111: the response does not echo the uploads
        parameters["mask"] = None
    return {
        "images": images,
        "parameters": parameters,
        "info": info_json(request, result, model_name=model_name, model_hash=model_hash,
                          job_timestamp=job_timestamp, interrupted=interrupted),
    }


def initial_options(*, model_name: str, model_hash: str | None, outdir: "Path | None") -> dict[str, Any]:
    """`GET /options` of a fresh server."""
    return {
        "sd_model_checkpoint": model_title(model_name, model_hash),
        "sd_checkpoint_hash": model_hash,
        "sd_vae": "Automatic",
        PREDICTION_OPTION: AUTOMATIC_PREDICTION,
        "samples_format": "png",
        "outdir_samples": str(outdir or ""),
        "save_images": outdir is not None,
        **preview_options(),
    }


# ---------------------------------------------------------------------------------------------
# Live previews: A1111's options <-> the request's preview fields.

PREVIEW_TYPES = {"Approx cheap": "approx-cheap", "TAESD": "taesd", "Full": "full"}
"""`show_progress_type` labels -> `GenerationRequest.preview_method` (A1111's "Approx NN" is not offered)."""
PREVIEW_CONTENTS = {"Combined": "combined", "Prompt": "prompt", "Negative prompt": "negative-prompt"}
"""`live_preview_content` labels -> `GenerationRequest.preview_content`."""
PREVIEW_OPTIONS = ("live_previews_enable", "show_progress_every_n_steps", "live_preview_content", "show_progress_type")


def preview_options() -> dict[str, Any]:
    """The preview options of a fresh server: on, every DEFAULT_PREVIEW_EVERY steps, the library's method/content."""
    from leansd.request import DEFAULT_PREVIEW_CONTENT, DEFAULT_PREVIEW_EVERY, DEFAULT_PREVIEW_METHOD

    return {
        "live_previews_enable": True,
        "show_progress_every_n_steps": DEFAULT_PREVIEW_EVERY,
        "live_preview_content": _label(PREVIEW_CONTENTS, DEFAULT_PREVIEW_CONTENT),
        "show_progress_type": _label(PREVIEW_TYPES, DEFAULT_PREVIEW_METHOD),
    }


def _label(labels: dict[str, str], value: str) -> str:
    return next(label for label, ours in labels.items() if ours == value)


def _lookup(name: str, value: object, labels: dict[str, str]) -> str:
    for label, ours in labels.items():
        if isinstance(value, str) and value.strip().lower() in (label.lower(), ours):
            return ours
    raise InvalidRequestError(f"{name} {value!r} is not available; valid: {', '.join(labels)}")


def preview_fields(options: dict[str, Any], overrides: dict[str, Any] | None = None, *,
                   taesd: bool) -> dict[str, Any]:
    """`GenerationRequest` preview fields from the server's options (and a request's override_settings).

    `show_progress_every_n_steps` <= 0 (A1111's -1: "only at the end") or `live_previews_enable`
    false turn previews off. `taesd`: whether the engine has TAESD weights.
    """
    from leansd.request import MAX_STEPS

    values = {**preview_options(), **{k: options[k] for k in PREVIEW_OPTIONS if k in options},
              **{k: v for k, v in (overrides or {}).items() if k in PREVIEW_OPTIONS}}
    enable, every = values["live_previews_enable"], values["show_progress_every_n_steps"]
    if not isinstance(enable, bool):
        raise InvalidRequestError(f"live_previews_enable must be true or false, got {enable!r}")
    if isinstance(every, bool) or not isinstance(every, int) or not -1 <= every <= MAX_STEPS:
        raise InvalidRequestError(
            f"show_progress_every_n_steps must be an integer from -1 (previews off) to {MAX_STEPS}, got {every!r}"
        )
    method = _lookup("show_progress_type", values["show_progress_type"], PREVIEW_TYPES)
    content = _lookup("live_preview_content", values["live_preview_content"], PREVIEW_CONTENTS)
    on = enable and every > 0
    if on and method == "taesd" and not taesd:
        raise InvalidRequestError("show_progress_type TAESD needs TAESD weights: start the server with --taesd PATH|ID")
    return {"preview_every": every if on else 0, "preview_method": method, "preview_content": content}


READ_ONLY_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash", "outdir_samples", "save_images")
PREDICTION_OPTION = "prediction_type"
"""Not an A1111 option (A1111 reads a .yaml beside the checkpoint): what the checkpoint predicts, as
`--prediction-type`. A model-load option, so it sits with `sd_model_checkpoint` in /options and
override_settings: "Automatic" (what the model says), "epsilon" or "v_prediction"."""
AUTOMATIC_PREDICTION = "Automatic"
PREDICTION_OPTION_VALUES = (AUTOMATIC_PREDICTION, "epsilon", "v_prediction")


def prediction_label(choice: str) -> str:
    """A `prediction_choice` ("auto", "epsilon", "v_prediction") -> the option's value (PREDICTION_OPTION_VALUES)."""
    return AUTOMATIC_PREDICTION if choice == "auto" else choice


def check_prediction_option(value: object, *, label: str) -> str:
    """A `prediction_type` option from a client -> "auto", "epsilon" or "v_prediction"."""
    from leansd.request import prediction_choice

    try:
        return prediction_choice(value)
    except InvalidRequestError:
        raise InvalidRequestError(
            f"{label} must be {AUTOMATIC_PREDICTION}, epsilon or v_prediction, got {brief(value)}") from None


SETTABLE_OPTIONS = (
    "sd_vae", PREDICTION_OPTION, "samples_format", "jpeg_quality", "CLIP_stop_at_last_layers", "eta_ddim", "eta_ancestral",
    "live_previews_enable", "show_progress_every_n_steps", "samples_save", "grid_save", "return_grid",
    "enable_pnginfo", "add_model_hash_to_info", "add_model_name_to_info", "img2img_fix_steps",
    "do_not_show_images", "sd_vae_as_default", "live_preview_content", "show_progress_type",
)
"""A1111 options a client may set; they are kept and returned by GET /options. Other keys are ignored
(never stored, so a client cannot grow the server's memory), as are the read-only ones."""
MAX_OPTION_TEXT = 1000


def check_vae_option(value: object, *, library: Any, label: str) -> str:
    """An `sd_vae` from a client: Automatic, None or a VAE of the library, never a path on the server."""
    from leansd.models.vae_override import AUTOMATIC, NONE, resolve_vae

    text = str(value)
    if len(text) > MAX_OPTION_TEXT:
        raise InvalidRequestError(f"{label} must be a text of at most {MAX_OPTION_TEXT} characters, got {brief(value)}")
    if text.strip().lower() in (AUTOMATIC.lower(), NONE.lower()):
        return text
    if library is None:
        raise InvalidRequestError(f"{label} {brief(value)}: this server has no VAE folder; valid: {AUTOMATIC}, {NONE}")
    try:
        resolve_vae(text, library=library, checkpoint=None, allow_paths=False)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{label}: {one_line(exc, limit=400)}") from exc
    return text


def update_options(options: dict[str, Any], body: object, *, model_name: str, taesd: bool = False,
                   library: Any = None) -> list[str]:
    """`POST /options`: keep the known settable options; the hash and the output folder stay as served.
    Returns the keys that were ignored (unknown to this server).

    The live preview options are checked first (`preview_fields`): a bad value changes nothing.
    `sd_model_checkpoint` may name a checkpoint of the library: it is stored (its title); the HTTP
    API and the web UI then queue a model-switch job that loads it (never racing a generation)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the options body must be a JSON object")
    preview_fields({**options, **body}, taesd=taesd)
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint is not None and not same_model(str(checkpoint), model_name):
        entry = None if library is None else library.find_checkpoint(str(checkpoint))
        if entry is None:
            raise InvalidRequestError(
                f"sd_model_checkpoint {brief(checkpoint)} is not available; this server serves {model_name!r}"
                + ("" if library is None else " and the checkpoints of its model folder (--ckpt-dir)")
            )
        chosen = entry.title(None)
    else:
        chosen = None
    if body.get("sd_vae") is not None:
        check_vae_option(body["sd_vae"], library=library, label="sd_vae")
    if PREDICTION_OPTION in body:
        body = {**body, PREDICTION_OPTION: prediction_label(check_prediction_option(body[PREDICTION_OPTION],
                                                                                    label=PREDICTION_OPTION))}
    accepted: dict[str, Any] = {}
    ignored = []
    for key, value in body.items():
        if key in READ_ONLY_OPTIONS:
            continue
        if key not in SETTABLE_OPTIONS:
            ignored.append(key)
            continue
        if not (value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value))
                or (isinstance(value, str) and len(value) <= MAX_OPTION_TEXT)):
            raise InvalidRequestError(
                f"option {key} must be a finite number, true/false or a text of at most {MAX_OPTION_TEXT} characters, "
                f"got {brief(value)}"
            )
        accepted[key] = value
    options.update(accepted)
    if chosen is not None:
        options["sd_model_checkpoint"] = chosen
    if ignored:
        logger.info("options ignored (unknown to this server): %s", brief(ignored, limit=200))
    return ignored


def sd_models(*, model_name: str, model_hash: str | None, source: str) -> list[dict[str, Any]]:
    return [{
        "title": model_title(model_name, model_hash),
        "model_name": model_name,
        "hash": model_hash,
        "sha256": None,
        "filename": source,
        "config": None,
    }]


def samplers() -> list[dict[str, Any]]:
    from leansd.sampling.samplers import SAMPLERS

    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS]


def schedulers() -> list[dict[str, Any]]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": None, "need_inner_model": False}
            for name, label in SCHEDULERS]


def upscalers() -> list[dict[str, Any]]:
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None}
            for name in UPSCALERS]


def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": name} for name in LATENT_UPSCALERS]


def progress(queue: "JobQueue", *, skip_current_image: bool = False,
             cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """`GET /progress`: the running job's step, fraction and ETA, the queue behind it, and (unless
    `skip_current_image`) its latest live preview as base64 PNG in `current_image`. `cache` (a dict
    the caller keeps) holds the last encoding, so clients polling often do not re-encode a preview."""
    job = queue.current
    waiting = queue.waiting()
    p = None if job is None else job.progress
    state = {
        "skipped": bool(job and job.skip_requested),
        "interrupted": bool(job and job.stop_requested),
        "stopping_generation": False,
        "job": "" if job is None else f"job {job.id}",
        "job_count": len(waiting) + (job is not None),
        "job_timestamp": "0" if job is None or job.started is None else _timestamp(job.started),
        "job_no": 0,
        "sampling_step": 0 if p is None else p.step,
        "sampling_steps": 0 if p is None else p.total_steps,
        "job_id": None if job is None else job.id,
        "queue": [j.id for j in waiting],
    }
    preview = None if job is None or skip_current_image else job.preview
    current_image = None
    if job is not None and preview is not None:
        key = (job.id, job.preview_id)
        if cache is not None and cache.get("key") == key:
            current_image = cache["png"]
        else:
            current_image = encode_png(preview, None)
            if cache is not None:
                cache.update(key=key, png=current_image)
    return {
        "progress": 0.0 if p is None else p.fraction,
        "eta_relative": 0.0 if p is None or p.eta_seconds is None else p.eta_seconds,
        "state": state,
        "current_image": current_image,
        "textinfo": None if p is None else f"step {p.step}/{p.total_steps}, batch {p.batch_index + 1}/{p.n_batches}",
    }


def job_timestamp() -> str:
    """A1111's `job_timestamp`: local time as YYYYmmddHHMMSS."""
    return datetime.datetime.now().strftime("%Y%m%d%H%M%S")


def _timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y%m%d%H%M%S")


def failure(exc: BaseException) -> tuple[str, str]:
    """(error name, one-line message) for a job that failed inside the model."""
    if is_out_of_memory(exc):
        return "OutOfMemoryError", (
            "the device ran out of memory during this job; try a smaller batch_size, width/height or "
            f"hires size ({one_line(exc, limit=160)})"
        )
    return type(exc).__name__, f"generation failed: {type(exc).__name__}: {one_line(exc, limit=200)}"


# ---------------------------------------------------------------------------------------------
# The model library: checkpoints, LoRAs, embeddings and VAEs as A1111 lists them


def library_models(library: Any, *, model_name: str, model_hash: str | None, source: str) -> list[dict[str, Any]]:
    """`GET /sd-models`: the loaded model first, then every checkpoint of the library.

    A library file's hash is given only once known (A1111 too lists `hash: null` until a file has
    been hashed); its title is then `relative/path.safetensors [hash]`.
    """
    models = sd_models(model_name=model_name, model_hash=model_hash, source=source)
    loaded = {str(Path(source).resolve())} if source else set()
    for entry in library.entries("checkpoint"):
        if str(entry.path.resolve()) in loaded:
            continue
        models.append({"title": entry.title(None), "model_name": Path(entry.relative).with_suffix("").as_posix(),
                       "hash": None, "sha256": None, "filename": str(entry.path), "config": None})
    return models


def lora_list(library: Any) -> list[dict[str, Any]]:
    """`GET /loras`: name, alias, path and the safetensors metadata of every LoRA, as A1111's Lora extension."""
    from leansd.models.hashes import safetensors_header

    out = []
    for entry in library.entries("lora"):
        metadata: dict[str, Any] = {}
        if entry.path.suffix.lower() == ".safetensors":
            try:
                metadata = dict(safetensors_header(entry.path)[1].get("__metadata__") or {})
            except (OSError, ValueError):
                metadata = {}
        alias = metadata.get("ss_output_name") if isinstance(metadata.get("ss_output_name"), str) else entry.name
        out.append({"name": entry.name, "alias": alias, "path": str(entry.path), "metadata": metadata})
    return out


def embedding_list(store: Any) -> dict[str, Any]:
    """`GET /embeddings`: {"loaded": {...}, "skipped": {...}} with A1111's fields per embedding."""
    loaded, skipped = store.status()

    def item(emb: Any) -> dict[str, Any]:
        vectors = emb.for_encoder(store.encoder)
        return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                "shape": int(vectors.shape[-1]), "vectors": int(vectors.shape[0])}

    return {
        "loaded": {name: item(emb) for name, emb in loaded.items()},
        "skipped": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                           "vectors": None, "reason": reason} for name, reason in skipped.items()},
    }


def vae_list(library: Any) -> list[dict[str, Any]]:
    """`GET /sd-vae`: every VAE file, as {"model_name": file name, "filename": path}."""
    return [{"model_name": entry.path.name, "filename": str(entry.path)} for entry in library.entries("vae")]


def with_model_options(gen: GenerationRequest, *, options: dict[str, Any], engine: object,
                       model_name: str) -> GenerationRequest:
    """`gen` with the checkpoint, VAE and prediction type chosen through the options (`sd_model_checkpoint`,
    `sd_vae`, `prediction_type`) where the request does not name its own; the engine switches inside the job. One rule
    for the HTTP API and the web UI."""
    from dataclasses import replace

    chosen = options.get("sd_model_checkpoint")
    if gen.checkpoint is None and chosen and not same_model(str(chosen), model_name):
        gen = replace(gen, checkpoint=str(chosen))
    vae = options.get("sd_vae")
    if gen.vae is None and vae is not None and vae != getattr(engine, "vae_choice", vae):
        gen = replace(gen, vae=str(vae))
    prediction = options.get(PREDICTION_OPTION)
    current = getattr(engine, "prediction_choice", None)
    if gen.prediction_type is None and prediction is not None and current is not None:
        choice = check_prediction_option(prediction, label=PREDICTION_OPTION)
        if choice != current:
            gen = replace(gen, prediction_type=choice)
    return gen
