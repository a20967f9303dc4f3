"""HTTP API in AUTOMATIC1111's `/sdapi/v1` dialect (FastAPI), so existing A1111 clients work unchanged.

`create_app(engine_or_queue)` builds a self-contained app: its own `JobQueue` (one worker thread
owns the engine), its own options, no module-level state. Every request is validated (base64,
image decoding, sizes, limits, sampler) before it reaches the queue; bad input answers 400
(semantic) or 422 (wrong JSON types) with `{"error": ..., "detail": "<one line>"}`, never 500.
Generation runs on the worker thread; handlers await its future, so the event loop stays free.
See docs/API.md for the endpoint reference.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import io
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send

from leansd.errors import InvalidRequestError, LeansdError, one_line
from leansd.service.queue import (
    DEFAULT_MAX_QUEUE,
    Job,
    JobCancelledError,
    JobQueue,
    QueueClosedError,
    QueueFullError,
)

if TYPE_CHECKING:
    from PIL import Image

    from leansd.request import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

API = "/sdapi/v1"
DEFAULT_MAX_SIZE = 2048
DEFAULT_MAX_STEPS = 150
DEFAULT_MAX_IMAGES = 16
MAX_BODY_IMAGE_BYTES = 64 * 2**20
DISCONNECT_POLL_SECONDS = 0.25

# A1111 `inpainting_fill` numbers -> ours.
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent-noise", 3: "latent-nothing"}
SCHEDULERS = (("automatic", "Automatic"), ("karras", "Karras"))
UPSCALERS = ("None", "Lanczos")
LATENT_UPSCALERS = ("Latent",)


# ---------------------------------------------------------------------------------------------
# Request models: A1111's field names and defaults; unknown fields are ignored, as A1111 does.


class _A1111Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = -1
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0.0
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    scheduler: Optional[str] = None
    batch_size: Optional[int] = 1
    n_iter: Optional[int] = 1
    steps: Optional[int] = 50
    cfg_scale: Optional[float] = 7.0
    width: Optional[int] = 512
    height: Optional[int] = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    eta: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    script_name: Optional[str] = None
    script_args: Optional[list[Any]] = None
    alwayson_scripts: Optional[dict[str, Any]] = None
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False


class Txt2ImgRequest(_A1111Request):
    enable_hr: Optional[bool] = False
    denoising_strength: Optional[float] = 0.75
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0


class Img2ImgRequest(_A1111Request):
    init_images: Optional[list[str]] = None
    denoising_strength: Optional[float] = 0.75
    mask: Optional[str] = None
    mask_blur: Optional[int] = None
    mask_blur_x: Optional[int] = 4
    mask_blur_y: Optional[int] = 4
    inpainting_fill: Optional[int] = 0
    inpainting_mask_invert: Optional[int] = 0
    inpaint_full_res: Optional[bool] = True
    resize_mode: Optional[int] = 0
    include_init_images: Optional[bool] = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = ""


# ---------------------------------------------------------------------------------------------
# Errors


class HTTPError(LeansdError):
    """An error with its status code; answered as `{"error": name, "detail": message}`."""

    def __init__(self, status: int, message: str, *, name: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.name = name
        self.headers = headers or {}


def _error(status: int, name: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": name, "detail": one_line(detail)}, status_code=status, headers=headers)


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message)


# ---------------------------------------------------------------------------------------------
# Decoding inputs


def decode_base64_image(data: object, *, label: str, mask: bool = False) -> "Image.Image":
    """A base64 image (with or without a `data:image/...;base64,` prefix) -> RGB (or "L" mask).

    Decoding goes through `load_image`/`load_mask`, so uploads get exactly the CLI's checks
    (decompression bombs, truncated files, EXIF rotation, transparency rules).
    """
    from leansd.inputs.images import load_image, load_mask

    if not isinstance(data, str) or not data.strip():
        raise _bad(f"{label} must be a base64-encoded image, got {'an empty string' if data == '' else type(data).__name__}")
    text = data.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise _bad(f"{label}: a data URL must look like data:image/png;base64,<data>")
    if len(text) > MAX_BODY_IMAGE_BYTES * 4 // 3 + 4:
        raise _bad(f"{label}: the image is larger than {MAX_BODY_IMAGE_BYTES // 2**20} MB")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{label} is not valid base64") from None
    with tempfile.TemporaryDirectory(prefix="leansd-upload-") as folder:
        path = Path(folder) / "upload"
        path.write_bytes(raw)
        try:
            return (load_mask if mask else load_image)(path, label=label)
        except InvalidRequestError as exc:
            # The temporary file's name means nothing to the client.
            raise _bad(str(exc).replace(f"{label} {path}", label)) from None


def encode_png(image: "Image.Image", infotext: str | None) -> str:
    """Base64 PNG with A1111's `parameters` text chunk."""
    from PIL import PngImagePlugin

    from leansd.outputs.writer import INFOTEXT_KEY

    pnginfo = PngImagePlugin.PngInfo()
    if infotext is not None:
        pnginfo.add_text(INFOTEXT_KEY, infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# A1111 fields -> GenerationRequest


def sampler_from(sampler: str | None, scheduler: str | None) -> str:
    """A1111 sampler name plus `scheduler` ("Automatic", "Karras") -> our canonical sampler name."""
    from leansd.sampling.samplers import get_sampler, sampler_names

    spec = get_sampler(sampler or "Euler")
    key = (scheduler or "automatic").strip().lower()
    if key in ("automatic", "", "default"):
        return spec.name
    if key != "karras":
        raise _bad(
            f"unknown scheduler {scheduler!r}; valid: {', '.join(label for _, label in SCHEDULERS)}"
        )
    if spec.name.endswith(" Karras"):
        return spec.name
    karras = f"{spec.name} Karras"
    if karras not in sampler_names():
        with_karras = [n[: -len(' Karras')] for n in sampler_names() if n.endswith(" Karras")]
        raise _bad(
            f"scheduler 'Karras' is not available for sampler {spec.name!r}; it is for: {', '.join(with_karras)}"
        )
    return karras


def _unsupported(body: _A1111Request) -> None:
    """Features leansd does not have: a 400 that names them, never silence."""
    if body.restore_faces:
        raise _bad("restore_faces (face restoration) is not supported by leansd; send restore_faces: false")
    if body.script_name:
        raise _bad(f"scripts are not supported by leansd (script_name {body.script_name!r}); leave script_name empty")
    if body.alwayson_scripts:
        names = ", ".join(sorted(map(str, body.alwayson_scripts)))
        raise _bad(f"extension scripts are not supported by leansd (alwayson_scripts: {names})")
    if body.styles:
        raise _bad("prompt styles are not supported by leansd; send the full prompt instead of styles")
    if body.subseed_strength:
        raise _bad("variation seeds (subseed_strength > 0) are not supported by leansd")


def _common_fields(body: _A1111Request, *, model_name: str, limits: "Limits") -> dict[str, Any]:
    _unsupported(body)
    checkpoint = (body.override_settings or {}).get("sd_model_checkpoint")
    if checkpoint and not _same_model(str(checkpoint), model_name):
        raise _bad(
            f"override_settings.sd_model_checkpoint {checkpoint!r} is not the loaded model {model_name!r}; "
            "this server serves one model"
        )
    width = 512 if body.width is None else body.width
    height = 512 if body.height is None else body.height
    steps = 50 if body.steps is None else body.steps
    batch_size = 1 if body.batch_size is None else body.batch_size
    n_iter = 1 if body.n_iter is None else body.n_iter
    for name, value in (("width", width), ("height", height)):
        if value > limits.max_size:
            raise _bad(f"{name} must be at most {limits.max_size} on this server, got {value}")
    if steps > limits.max_steps:
        raise _bad(f"steps must be at most {limits.max_steps} on this server, got {steps}")
    if batch_size >= 1 and n_iter >= 1 and batch_size * n_iter > limits.max_images:
        raise _bad(
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
        guidance_scale=7.0 if body.cfg_scale is None else body.cfg_scale,
        width=width,
        height=height,
        tiling=bool(body.tiling),
        eta=0.0 if body.eta is None else body.eta,
    )


def txt2img_request(body: Txt2ImgRequest, *, model_name: str, limits: "Limits") -> "GenerationRequest":
    from leansd.request import GenerationRequest

    fields = _common_fields(body, model_name=model_name, limits=limits)
    if body.enable_hr:
        upscaler = body.hr_upscaler or "Latent"
        if upscaler.lower().startswith("latent"):
            fields["hires_upscaler"] = "latent"
        elif upscaler.lower() in ("none", "lanczos"):
            fields["hires_upscaler"] = "lanczos"  # A1111's "None" upscaler resizes with Lanczos too
        else:
            raise _bad(
                f"hr_upscaler {upscaler!r} is not available; valid: {', '.join(LATENT_UPSCALERS + UPSCALERS)} "
                "(names starting with 'Latent' use the latent upscaler)"
            )
        rx, ry = body.hr_resize_x or 0, body.hr_resize_y or 0
        if rx or ry:
            fields["hires_width"] = rx or None
            fields["hires_height"] = ry or None
        else:
            fields["hires_scale"] = 2.0 if body.hr_scale is None else body.hr_scale
        fields["hires_steps"] = body.hr_second_pass_steps or None
        fields["hires_strength"] = 0.75 if body.denoising_strength is None else body.denoising_strength
    request = GenerationRequest(**fields).validated()  # checks hires_scale is finite and in range first
    if request.hires:
        from leansd.pipelines.txt2img import hires_target

        target = hires_target(request, width=request.width or 512, height=request.height or 512)
        assert target is not None  # request.hires is set
        width, height = target
        if max(width, height) > limits.max_size:
            raise _bad(
                f"the hires pass would be {width}x{height}; the largest side allowed on this server "
                f"is {limits.max_size}"
            )
    return request


def img2img_request(body: Img2ImgRequest, *, model_name: str, limits: "Limits") -> "GenerationRequest":
    from leansd.inputs.images import resize_mode_name
    from leansd.request import GenerationRequest

    fields = _common_fields(body, model_name=model_name, limits=limits)
    images = body.init_images or []
    if not images:
        raise _bad("init_images must hold one base64-encoded image")
    if len(images) > 1:
        raise _bad(f"init_images holds {len(images)} images; leansd takes one init image per request")
    fill = 0 if body.inpainting_fill is None else body.inpainting_fill
    if fill not in INPAINTING_FILL:
        raise _bad(
            f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), got {fill}"
        )
    blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
    fields.update(
        init_image=decode_base64_image(images[0], label="init_images[0]"),
        strength=0.75 if body.denoising_strength is None else body.denoising_strength,
        resize_mode=resize_mode_name(0 if body.resize_mode is None else body.resize_mode),
        mask_blur=4 if blur is None else blur,
        inpainting_fill=INPAINTING_FILL[fill],
        invert_mask=bool(body.inpainting_mask_invert),
    )
    if body.mask:
        fields["mask"] = decode_base64_image(body.mask, label="mask", mask=True)
    return GenerationRequest(**fields).validated()


def _same_model(name: str, model_name: str) -> bool:
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
        "version": f"leansd {_version()}",
        "interrupted": interrupted,
        "timings": result.timings,
    }
    return json.dumps(info)


def _version() -> str:
    from leansd import __version__

    return __version__


class Limits:
    def __init__(self, *, max_size: int, max_steps: int, max_images: int) -> None:
        self.max_size = max_size
        self.max_steps = max_steps
        self.max_images = max_images


# ---------------------------------------------------------------------------------------------
# Middleware: HTTP Basic auth on every route, and no cross-origin POSTs.


class GuardMiddleware:
    """Pure ASGI middleware (runs before routing, so it covers every route incl. /docs).

    - `credentials`: {user: password}; when given, every request needs matching HTTP Basic
      credentials (compared in constant time) or gets 401.
    - State-changing requests (POST, PUT, PATCH, DELETE) that carry an `Origin` header other than
      the server's own (or one in `allowed_origins`) get 403: a web page on another site cannot
      make the browser start or stop generations.
    """

    def __init__(self, app: ASGIApp, *, credentials: dict[str, str] | None,
                 allowed_origins: Sequence[str] = ()) -> None:
        self.app = app
        self.credentials = {u.encode(): p.encode() for u, p in (credentials or {}).items()}
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.credentials and not self._authorised(headers.get("authorization", "")):
            response = _error(401, "Unauthorized", "authentication required: send HTTP Basic credentials",
                              headers={"WWW-Authenticate": 'Basic realm="leansd"'})
            await response(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE") and "origin" in headers:
            origin = headers["origin"].rstrip("/").lower()
            own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()
            if origin != own and origin not in self.allowed_origins:
                response = _error(403, "Forbidden", f"cross-origin request from {headers['origin']!r} refused")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authorised(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token:
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        if not sep:
            return False
        ok = False
        for known_user, known_password in self.credentials.items():
            # Both comparisons always run, so timing does not tell which part was wrong.
            user_ok = secrets.compare_digest(user, known_user)
            password_ok = secrets.compare_digest(password, known_password)
            ok |= user_ok & password_ok
        return ok


def parse_credentials(text: str) -> dict[str, str]:
    """`user:pass` (or several, comma-separated, as A1111's --api-auth) -> {user: pass}."""
    credentials = {}
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise InvalidRequestError("--api-auth expects user:password (several separated by commas)")
        credentials[user] = password
    return credentials


# ---------------------------------------------------------------------------------------------
# The app


def create_app(
    engine_or_queue: Any,
    *,
    auth: "str | dict[str, str] | None" = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    save_dir: "str | os.PathLike[str] | None" = None,
    max_size: int = DEFAULT_MAX_SIZE,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_images: int = DEFAULT_MAX_IMAGES,
    allowed_origins: Sequence[str] = (),
    shutdown_timeout: float = 30.0,
    ui: bool = True,
) -> FastAPI:
    """A FastAPI app speaking A1111's `/sdapi/v1` for one engine.

    `engine_or_queue`: an `Engine` (the app builds and owns a `JobQueue` over it, started and
    shut down with the app) or a `JobQueue` (the caller owns it). `auth`: "user:pass" or
    {user: pass} for HTTP Basic on every route. `save_dir`: when set, every generated image is
    also written there (`txt2img-images/`, `img2img-images/`) with the usual names; no request
    field can change where. `ui`: also serve the Gradio web UI at `/` (leansd.frontends.webui),
    over the same queue and behind the same auth and Origin checks.
    """
    from contextlib import asynccontextmanager

    if isinstance(engine_or_queue, JobQueue):
        queue, owns_queue = engine_or_queue, False
    else:
        queue, owns_queue = JobQueue(engine_or_queue, max_queue=max_queue), True
    engine = queue.engine
    bundle = getattr(engine, "bundle", None)
    model_name = getattr(bundle, "name", None) or "model"
    model_hash = getattr(bundle, "hash", None)
    model_source = str(getattr(bundle, "source", model_name))
    limits = Limits(max_size=max_size, max_steps=max_steps, max_images=max_images)
    credentials = parse_credentials(auth) if isinstance(auth, str) else auth
    outputs = None if save_dir is None else Path(save_dir).resolve()
    options: dict[str, Any] = {
        "sd_model_checkpoint": _model_title(model_name, model_hash),
        "sd_checkpoint_hash": model_hash,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "outdir_samples": str(outputs or ""),
        "save_images": outputs is not None,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if owns_queue:
            queue.start()
        try:
            yield
        finally:
            if owns_queue:
                await asyncio.to_thread(queue.shutdown, shutdown_timeout)

    app = FastAPI(title="leansd", version=_version(), lifespan=lifespan,
                  description="AUTOMATIC1111-compatible /sdapi/v1 API served by leansd")
    app.state.queue = queue
    app.state.limits = limits
    app.add_middleware(GuardMiddleware, credentials=credentials, allowed_origins=allowed_origins)

    # ---- errors ---------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {one_line(repr(got), limit=60)})"
            parts.append(f"{where}: {err.get('msg', 'invalid')}{shown}")
        return _error(422, "RequestValidationError", "; ".join(parts) or "invalid request body")

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error(400, "InvalidRequestError", str(exc))

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError) -> JSONResponse:
        return _error(503, "QueueFullError", str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(QueueClosedError)
    async def _closed(request: Request, exc: QueueClosedError) -> JSONResponse:
        return _error(503, "QueueClosedError", str(exc), headers={"Retry-After": "30"})

    @app.exception_handler(JobCancelledError)
    async def _cancelled(request: Request, exc: JobCancelledError) -> JSONResponse:
        return _error(503, "JobCancelledError", str(exc), headers={"Retry-After": "30"})

    @app.exception_handler(HTTPError)
    async def _http(request: Request, exc: HTTPError) -> JSONResponse:
        return _error(exc.status, exc.name or type(exc).__name__, str(exc), headers=exc.headers)

    # ---- generation -----------------------------------------------------------------------

    async def run(http_request: Request, gen: "GenerationRequest", body: _A1111Request, task: str) -> dict:
        if body.save_images and outputs is None:
            raise _bad("save_images needs the server started with --save-images")
        job = queue.submit(gen)
        job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        try:
            result = await _await_job(http_request, queue, job)
        except LeansdError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed job answers 500 with one line, the server lives on
            raise _job_failed(exc) from exc
        images = []
        if outputs is not None and result.images:
            await asyncio.to_thread(_save, outputs / f"{task}-images", result)
        if body.send_images is not False:
            images = await asyncio.to_thread(
                lambda: [encode_png(im, info) for im, info in zip(result.images, result.infotexts, strict=True)]
            )
        parameters = body.model_dump()
        if isinstance(body, Img2ImgRequest):
            parameters["init_images"] = None  # as A1111: the response does not echo the uploads
            parameters["mask"] = None
        return {
            "images": images,
            "parameters": parameters,
            "info": info_json(gen, result, model_name=model_name, model_hash=model_hash,
                              job_timestamp=job_timestamp, interrupted=job.interrupted),
        }

    @app.post(f"{API}/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request) -> dict:
        gen = txt2img_request(body, model_name=model_name, limits=limits)
        return await run(request, gen, body, "txt2img")

    @app.post(f"{API}/img2img")
    async def img2img(body: Img2ImgRequest, request: Request) -> dict:
        # Decoding the uploads (CPU work) happens off the event loop.
        gen = await asyncio.to_thread(img2img_request, body, model_name=model_name, limits=limits)
        return await run(request, gen, body, "img2img")

    # ---- progress and control ---------------------------------------------------------------

    @app.get(f"{API}/progress")
    async def progress(skip_current_image: bool = False) -> dict:
        job = queue.current
        waiting = len(queue.waiting())
        state = {
            "skipped": bool(job and job.skip_requested),
            "interrupted": bool(job and job.stop_requested),
            "stopping_generation": False,
            "job": "" if job is None else f"job {job.id}",
            "job_count": waiting + (job is not None),
            "job_timestamp": "0" if job is None or job.started is None
            else datetime.datetime.fromtimestamp(job.started).strftime("%Y%m%d%H%M%S"),
            "job_no": 0,
            "sampling_step": 0 if job is None else job.progress.step,
            "sampling_steps": 0 if job is None else job.progress.total_steps,
            "job_id": None if job is None else job.id,
            "queue": [j.id for j in queue.waiting()],
        }
        p = None if job is None else job.progress
        return {
            "progress": 0.0 if p is None else p.fraction,
            "eta_relative": 0.0 if p is None or p.eta_seconds is None else p.eta_seconds,
            "state": state,
            "current_image": None,
            "textinfo": None if p is None else f"step {p.step}/{p.total_steps}, batch {p.batch_index + 1}/{p.n_batches}",
        }

    @app.post(f"{API}/interrupt")
    async def interrupt() -> Any:
        queue.interrupt()
        return {}

    @app.post(f"{API}/skip")
    async def skip() -> Any:
        queue.skip()
        return {}

    # ---- options and lists ------------------------------------------------------------------

    @app.get(f"{API}/options")
    async def get_options() -> dict:
        return dict(options)

    @app.post(f"{API}/options")
    async def set_options(request: Request) -> None:
        try:
            body = await request.json()
        except ValueError:
            raise _bad("the options body must be a JSON object") from None
        if not isinstance(body, dict):
            raise _bad("the options body must be a JSON object")
        checkpoint = body.get("sd_model_checkpoint")
        if checkpoint is not None and not _same_model(str(checkpoint), model_name):
            raise _bad(f"sd_model_checkpoint {checkpoint!r} is not available; this server serves {model_name!r}")
        for key, value in body.items():
            if key not in ("sd_model_checkpoint", "sd_checkpoint_hash", "outdir_samples", "save_images"):
                options[key] = value
        return None

    @app.get(f"{API}/cmd-flags")
    async def cmd_flags() -> dict:
        return {"api": True, "listen": None, "api_auth": None}

    @app.get(f"{API}/sd-models")
    async def sd_models() -> list:
        return [{
            "title": _model_title(model_name, model_hash),
            "model_name": model_name,
            "hash": model_hash,
            "sha256": None,
            "filename": model_source,
            "config": None,
        }]

    @app.post(f"{API}/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        return None

    @app.get(f"{API}/samplers")
    async def samplers() -> list:
        from leansd.sampling.samplers import SAMPLERS

        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS]

    @app.get(f"{API}/schedulers")
    async def schedulers() -> list:
        return [{"name": name, "label": label, "aliases": None, "default_rho": None, "need_inner_model": False}
                for name, label in SCHEDULERS]

    @app.get(f"{API}/upscalers")
    async def upscalers() -> list:
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None}
                for name in UPSCALERS]

    @app.get(f"{API}/latent-upscale-modes")
    async def latent_upscale_modes() -> list:
        return [{"name": name} for name in LATENT_UPSCALERS]

    for path in ("sd-vae", "loras", "hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles",
                 "sd-modules"):
        app.add_api_route(f"{API}/{path}", _empty_list, methods=["GET"], name=path)

    @app.get(f"{API}/embeddings")
    async def embeddings() -> dict:
        return {"loaded": {}, "skipped": {}}

    @app.get(f"{API}/scripts")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get(f"{API}/memory")
    async def memory() -> dict:
        return {"ram": {}, "cuda": {}}

    @app.post(f"{API}/png-info")
    async def png_info(body: PngInfoRequest) -> dict:
        return await asyncio.to_thread(_png_info, body.image)

    # ---- leansd's own queue view ------------------------------------------------------------

    @app.get("/leansd/v1/queue")
    async def queue_status() -> dict:
        return queue.status()

    @app.delete("/leansd/v1/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict:
        if not queue.cancel(job_id):
            raise HTTPError(404, f"no queued or running job {job_id!r}", name="NotFound")
        return {"cancelled": job_id}

    if ui:  # last: the UI is mounted at "/", so every route above keeps precedence
        from leansd.frontends.webui import mount_ui

        mount_ui(app, queue, limits=limits, model_name=model_name, save_dir=outputs)
    return app


def _job_failed(exc: BaseException) -> HTTPError:
    if type(exc).__name__ == "OutOfMemoryError":
        return HTTPError(
            500, "the device ran out of memory during this job; try a smaller batch_size, width/height or "
            f"hires size ({one_line(exc, limit=160)})", name="OutOfMemoryError",
        )
    return HTTPError(500, f"generation failed: {type(exc).__name__}: {one_line(exc, limit=200)}",
                     name=type(exc).__name__)


async def _empty_list() -> list:
    return []


def _model_title(name: str, model_hash: str | None) -> str:
    return f"{name} [{model_hash}]" if model_hash else name


async def _await_job(http_request: Request, queue: JobQueue, job: Job) -> "GenerationResult":
    """Wait for the job without blocking the loop; cancel it if the client goes away meanwhile."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return future.result()
        if await http_request.is_disconnected():
            queue.cancel(job.id)
            logger.info("client went away: cancelled job %s", job.id)
            return await future  # raises JobCancelledError, answered to nobody


def _save(folder: Path, result: "GenerationResult") -> None:
    from leansd.outputs.writer import ImageWriter

    writer = ImageWriter(folder)
    for image, seed, info in zip(result.images, result.seeds, result.infotexts, strict=True):
        writer.save(image, seed=seed, infotext=info)


def _png_info(data: str) -> dict:
    from PIL import Image

    from leansd.outputs.infotext import parse_infotext
    from leansd.outputs.writer import INFOTEXT_KEY

    if not data:
        raise _bad("image is empty: send a base64-encoded PNG")
    text = data.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("image is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            items = {k: v for k, v in image.info.items() if isinstance(v, (str, int, float))}
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise _bad(f"image is not an image Pillow can read ({one_line(exc, limit=120)})") from None
    info = items.pop(INFOTEXT_KEY, None)
    if not isinstance(info, str):
        return {"info": "", "items": items, "parameters": {}}
    return {"info": info, "items": items, "parameters": parse_infotext(info)}


# ---------------------------------------------------------------------------------------------
# Serving (used by `leansd serve`)


def serve(
    engine_or_queue: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_queue: int = DEFAULT_MAX_QUEUE,
    shutdown_timeout: float = 30.0,
    log_level: str = "warning",
    on_ready: "Any | None" = None,
    **app_options: Any,
) -> int:
    """Run uvicorn until SIGINT/SIGTERM, then shut down gracefully.

    On the signal the queue closes at once (waiting jobs answer 503 "shutting down"), the running
    job may finish for `shutdown_timeout` seconds and is then cancelled, and the process exits.
    """
    import signal
    import threading

    import uvicorn

    queue = engine_or_queue if isinstance(engine_or_queue, JobQueue) else JobQueue(engine_or_queue, max_queue=max_queue)
    app = create_app(queue, **app_options)
    queue.start()

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not queue.closed:
                queue.close(reason="the server is shutting down")
                running = queue.current
                if running is not None:
                    # Give the running job its grace period, then stop it, so the exit is bounded.
                    timer = threading.Timer(shutdown_timeout, queue.cancel, args=(running.id,))
                    timer.daemon = True
                    timer.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5)
    server = _Server(config)
    if on_ready is not None:
        on_ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}")
    # uvicorn handles SIGINT/SIGTERM itself, then re-raises the signal once it has shut down; our
    # handlers turn that re-raise into a normal return, so a graceful stop exits with status 0.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _raise_stopped)
    try:
        server.run()
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        queue.shutdown(shutdown_timeout)
    return 0 if server.started else 1


class _Stopped(Exception):
    """A stop signal arrived after uvicorn's graceful shutdown."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped(signum)
