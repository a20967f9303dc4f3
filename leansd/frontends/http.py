"""HTTP API in AUTOMATIC1111's `/sdapi/v1` dialect (FastAPI), so existing A1111 clients work unchanged.

`create_app(engine_or_queue)` builds a self-contained app: its own `JobQueue` (one worker thread
owns the engine), its own options, no module-level state. The routes here are thin: the dialect
(schema, limits, translation to `GenerationRequest`, images, info JSON) is `leansd.frontends.a1111`,
auth and the Origin check are `leansd.frontends.guard`. Every request is validated (base64, image
decoding, sizes, limits, sampler) before it reaches the queue; bad input answers 400 (semantic) or
422 (wrong JSON types) with `{"error": ..., "detail": "<one line>"}`, never 500. Generation runs on
the worker thread; handlers await its future, so the event loop stays free.
See docs/API.md for the endpoint reference.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from leansd import __version__
from leansd.errors import InvalidRequestError, LeansdError, one_line
from leansd.frontends import a1111
from leansd.frontends.a1111 import (
    API,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_SIZE,
    DEFAULT_MAX_STEPS,
    INPAINTING_FILL,
    LATENT_UPSCALERS,
    MAX_BODY_IMAGE_BYTES,
    SCHEDULERS,
    UPSCALERS,
    A1111Request,
    Img2ImgRequest,
    Limits,
    PngInfoRequest,
    Txt2ImgRequest,
    decode_base64_image,
    encode_png,
    img2img_request,
    info_json,
    sampler_from,
    txt2img_request,
)
from leansd.frontends.guard import GuardMiddleware, error_response, parse_credentials
from leansd.frontends.limits import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_JOB_SECONDS,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_SECONDS,
)
from leansd.service.queue import (
    DEFAULT_MAX_QUEUE,
    Job,
    JobCancelledError,
    JobQueue,
    QueueClosedError,
    QueueFullError,
)

if TYPE_CHECKING:
    from leansd.request import GenerationRequest, GenerationResult

__all__ = [  # the dialect's names stay importable from here
    "API", "DEFAULT_MAX_IMAGES", "DEFAULT_MAX_SIZE", "DEFAULT_MAX_STEPS", "INPAINTING_FILL", "LATENT_UPSCALERS",
    "MAX_BODY_IMAGE_BYTES", "SCHEDULERS", "UPSCALERS", "GuardMiddleware", "HTTPError", "Img2ImgRequest", "Limits",
    "PngInfoRequest", "Txt2ImgRequest", "create_app", "decode_base64_image", "encode_png", "img2img_request",
    "info_json", "parse_credentials", "sampler_from", "serve", "txt2img_request",
]

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.25


class HTTPError(LeansdError):
    """An error with its status code; answered as `{"error": name, "detail": message}`."""

    def __init__(self, status: int, message: str, *, name: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.name = name
        self.headers = headers or {}


@dataclass
class _Server:
    """What the routes of one app share (kept on `app.state.server`; no module-level state)."""

    queue: JobQueue
    limits: Limits
    outputs: Path | None
    model_name: str
    model_hash: str | None
    model_source: str
    native_size: tuple[int, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    owns_queue: bool = False
    shutdown_timeout: float = DEFAULT_SHUTDOWN_SECONDS
    taesd: bool = False
    """Whether the engine has TAESD weights (TAESD previews)."""
    preview_png: dict[str, Any] = field(default_factory=dict)
    """The running job's latest preview as base64 PNG, kept for `/progress` (see a1111.progress)."""

    def follow_model(self) -> None:
        """Take the loaded model's name, hash and source (after a job that may have switched it)."""
        bundle = getattr(self.queue.engine, "bundle", None)
        if bundle is not None and bundle.name != self.model_name:
            self.model_name, self.model_hash, self.model_source = bundle.name, bundle.hash, str(bundle.source)

    def with_previews(self, gen: "GenerationRequest", body: A1111Request) -> "GenerationRequest":
        """The request with the live preview fields the options (and its override_settings) ask for."""
        import dataclasses

        fields = a1111.preview_fields(self.options, body.override_settings, taesd=self.taesd)
        return dataclasses.replace(gen, **fields)

    @classmethod
    def over(cls, queue: JobQueue, *, limits: Limits, outputs: Path | None, owns_queue: bool,
             shutdown_timeout: float) -> "_Server":
        """The shared state for `queue`'s engine: its model's name, hash, source and native size."""
        bundle = getattr(queue.engine, "bundle", None)
        name = getattr(bundle, "name", None) or "model"
        model_hash = getattr(bundle, "hash", None)
        options = a1111.initial_options(model_name=name, model_hash=model_hash, outdir=outputs)
        options["sd_vae"] = getattr(queue.engine, "vae_choice", options["sd_vae"])  # e.g. the CLI's --vae
        options[a1111.PREDICTION_OPTION] = a1111.prediction_label(getattr(queue.engine, "prediction_choice", "auto"))
        backend = getattr(getattr(queue.engine, "backend", None), "name", None)
        if backend is not None:
            options[BACKEND_OPTION] = backend  # leansd's own option: the compute backend in use
        return cls(
            queue=queue, limits=limits, outputs=outputs, model_name=name, model_hash=model_hash,
            model_source=str(getattr(bundle, "source", name)), native_size=a1111.native_size(queue.engine),
            options=options, owns_queue=owns_queue, shutdown_timeout=shutdown_timeout,
            taesd=getattr(queue.engine, "taesd", None) is not None,
        )


def _server(request: Request) -> _Server:
    return request.app.state.server


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start a queue the app owns with the app; on shutdown give its running job `shutdown_timeout`."""
    server: _Server = app.state.server
    if server.owns_queue:
        server.queue.start()
    try:
        yield
    finally:
        if server.owns_queue:
            await asyncio.to_thread(server.queue.shutdown, server.shutdown_timeout)
        for cleanup in app.state.cleanups:  # e.g. the web UI's scratch folder
            cleanup()


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
    allowed_hosts: "Sequence[str] | None" = (),
    max_body: int | None = DEFAULT_MAX_BODY,
    max_job_seconds: float | None = DEFAULT_MAX_JOB_SECONDS,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_SECONDS,
    ui: bool = True,
) -> FastAPI:
    """A FastAPI app speaking A1111's `/sdapi/v1` for one engine.

    `engine_or_queue`: an `Engine` (the app builds and owns a `JobQueue` over it, started and
    shut down with the app) or a `JobQueue` (the caller owns it). `auth`: "user:pass" or
    {user: pass} for HTTP Basic on every route. `save_dir`: when set, every generated image is
    also written there (`txt2img-images/`, `img2img-images/`) with the usual names; no request
    field can change where. `ui`: also serve the Gradio web UI at `/` (leansd.frontends.webui),
    over the same queue and behind the same auth and Origin checks.
    `allowed_hosts`: Host names accepted besides IP addresses and localhost (None: any Host);
    `max_body`: request body limit in bytes (413 beyond it); `max_job_seconds`: jobs estimated to
    run longer on this device are refused (None: no limit; only for a queue the app builds).
    See `leansd.frontends.guard`.
    """
    owns_queue = not isinstance(engine_or_queue, JobQueue)
    queue = (JobQueue(engine_or_queue, max_queue=max_queue, max_job_seconds=max_job_seconds) if owns_queue
             else engine_or_queue)
    server = _Server.over(
        queue, limits=Limits(max_size=max_size, max_steps=max_steps, max_images=max_images),
        outputs=None if save_dir is None else Path(save_dir).resolve(), owns_queue=owns_queue,
        shutdown_timeout=shutdown_timeout,
    )
    app = FastAPI(title="leansd", version=__version__, lifespan=_lifespan,
                  description="AUTOMATIC1111-compatible /sdapi/v1 API served by leansd")
    app.state.server = server
    app.state.queue = queue
    app.state.cleanups = []
    app.state.limits = server.limits
    credentials = parse_credentials(auth) if isinstance(auth, str) else auth
    app.add_middleware(GuardMiddleware, credentials=credentials, allowed_origins=allowed_origins,
                       allowed_hosts=None if allowed_hosts is None else list(allowed_hosts), max_body=max_body)
    for exc_class, handler in _EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
    for method, path, endpoint, name in _ROUTES:
        app.add_api_route(path, endpoint, methods=[method], name=name)
    if ui:  # last: the UI is mounted at "/", so every route above keeps precedence
        from leansd.frontends.webui import mount_ui

        mount_ui(app, queue, limits=server.limits, model_name=server.model_name, save_dir=server.outputs,
                 max_file_size=max_body, options=server.options)
    return app


# ---------------------------------------------------------------------------------------------
# Errors


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {one_line(repr(got), limit=60)})"
        parts.append(f"{where}: {err.get('msg', 'invalid')}{shown}")
    return error_response(422, "RequestValidationError", "; ".join(parts) or "invalid request body")


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    return error_response(400, "InvalidRequestError", str(exc))


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After: the queue is full (its mean job time), closed or the job was cancelled (30 s)."""
    retry_after = exc.retry_after if isinstance(exc, QueueFullError) else 30
    return error_response(503, type(exc).__name__, str(exc), headers={"Retry-After": str(retry_after)})


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPError)
    return error_response(exc.status, exc.name or type(exc).__name__, str(exc), headers=exc.headers)


async def _failed(request: Request, exc: Exception) -> JSONResponse:
    """Anything else (a job that failed, a bug): 500 with the JSON error shape, never plain text."""
    if isinstance(exc, LeansdError):
        return error_response(500, type(exc).__name__, str(exc))
    logger.error("unexpected error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    name, message = a1111.failure(exc)
    return error_response(500, name, message)


_EXCEPTION_HANDLERS: dict[type[Exception], Any] = {
    RequestValidationError: _validation,
    InvalidRequestError: _invalid,
    QueueFullError: _unavailable,
    QueueClosedError: _unavailable,
    JobCancelledError: _unavailable,
    HTTPError: _http,
    LeansdError: _failed,
    Exception: _failed,
}


def _job_failed(exc: BaseException) -> HTTPError:
    name, message = a1111.failure(exc)
    return HTTPError(500, message, name=name)


# ---------------------------------------------------------------------------------------------
# Routes: each reads the app's `_Server` and calls the dialect module.

_ROUTES: list[tuple[str, str, Callable[..., Any], str]] = []  # (method, path, endpoint, name), in order


def _route(method: str, path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        _ROUTES.append((method, path, endpoint, endpoint.__name__))
        return endpoint

    return register


async def _generate(http_request: Request, gen: "GenerationRequest", body: A1111Request, task: str) -> dict:
    server = _server(http_request)
    if body.save_images and server.outputs is None:
        raise InvalidRequestError("save_images needs the server started with --save-images")
    job = await asyncio.to_thread(server.queue.submit, gen)  # the job-time estimate counts FLOPs: off the loop
    job_timestamp = a1111.job_timestamp()
    try:
        result = await _await_job(http_request, server.queue, job)
    except LeansdError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed job answers 500 with one line, the server lives on
        raise _job_failed(exc) from exc
    images: list[str] = []
    save_error = None
    if server.outputs is not None and result.images:
        try:
            await asyncio.to_thread(_save, server.outputs / f"{task}-images", result)
        except (LeansdError, OSError) as exc:  # a full disk, a folder replaced by a file: keep the images
            logger.warning("saving the images failed: %s", one_line(exc, limit=300))
            # The client is told why, without the server's own paths (the log above has them).
            why = one_line(exc, limit=300).replace(str(server.outputs), "<outputs>")
            save_error = f"saving the images failed: {why}"
    if body.send_images is not False or save_error is not None:  # never lose a computed image
        images = await asyncio.to_thread(
            lambda: [encode_png(im, info) for im, info in zip(result.images, result.infotexts, strict=True)]
        )
    server.follow_model()
    answer = a1111.response(body, gen, result, images=images, model_name=server.model_name,
                            model_hash=server.model_hash, job_timestamp=job_timestamp, interrupted=job.interrupted)
    if save_error is not None:
        answer["warning"] = save_error
    return answer


@_route("POST", f"{API}/txt2img")
async def txt2img(body: Txt2ImgRequest, request: Request) -> dict:
    server = _server(request)
    gen = txt2img_request(body, model_name=server.model_name, limits=server.limits, native_size=server.native_size,
                          library=_library(request))
    gen = server.with_previews(gen, body)
    return await _generate(request, _with_options(server, gen), body, "txt2img")


@_route("POST", f"{API}/img2img")
async def img2img(body: Img2ImgRequest, request: Request) -> dict:
    server = _server(request)
    # Decoding the uploads (CPU work) happens off the event loop.
    gen = await asyncio.to_thread(img2img_request, body, model_name=server.model_name, limits=server.limits,
                                  library=_library(request))
    return await _generate(request, _with_options(server, server.with_previews(gen, body)), body, "img2img")


@_route("GET", f"{API}/progress")
async def progress(request: Request, skip_current_image: bool = False) -> dict:
    # PNG-encoding a full-size preview is CPU work: off the event loop.
    server = _server(request)
    return await asyncio.to_thread(a1111.progress, server.queue, skip_current_image=skip_current_image,
                                   cache=server.preview_png)


@_route("POST", f"{API}/interrupt")
async def interrupt(request: Request) -> Any:
    _server(request).queue.interrupt()
    return {}


@_route("POST", f"{API}/skip")
async def skip(request: Request) -> Any:
    _server(request).queue.skip()
    return {}


@_route("GET", f"{API}/options")
async def get_options(request: Request) -> dict:
    return dict(_server(request).options)


@_route("POST", f"{API}/options")
async def set_options(request: Request) -> None:
    server = _server(request)
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested thousands deep
        raise InvalidRequestError("the options body must be a JSON object") from None
    if isinstance(body, dict) and BACKEND_OPTION in body:  # first: a backend that cannot run changes nothing
        body = dict(body)
        server.options[BACKEND_OPTION] = _set_backend(server.queue.engine, body.pop(BACKEND_OPTION))
    before = dict(server.options)
    a1111.update_options(server.options, body, model_name=server.model_name, taesd=server.taesd,
                         library=_library(request))
    chosen = server.options.get("sd_model_checkpoint")
    if chosen is None or a1111.same_model(str(chosen), server.model_name):
        return None
    # As A1111: the checkpoint is loaded before the answer, by a model-switch job of the queue
    # (after the jobs already waiting, never racing one); a failure leaves the options as they were.
    try:
        job = server.queue.submit_switch(str(chosen))
        await _await_job(request, server.queue, job)
    except BaseException:
        server.options.clear()
        server.options.update(before)
        raise
    finally:
        server.follow_model()
    return None


BACKEND_OPTION = "leansd_backend"
"""`POST /options {"leansd_backend": "openvino"}`: the compute backend (auto, torch, openvino; see
docs/OPENVINO.md). Asking for openvino is the consent to convert the model; 400 where it cannot run."""


def _set_backend(engine: Any, value: object) -> str:
    from leansd.backends import check_backend_name

    name = check_backend_name(str(value))
    if not hasattr(engine, "set_backend"):
        raise InvalidRequestError("this server's models run on Ray replicas: choose the backend when it starts "
                                  "(leansd serve --backend)")
    return str(engine.set_backend(name))


@_route("GET", f"{API}/cmd-flags")
async def cmd_flags() -> dict:
    return {"api": True, "listen": None, "api_auth": None}


def _with_options(server: _Server, gen: "GenerationRequest") -> "GenerationRequest":
    """The checkpoint and VAE set through /options, for a request that does not override them."""
    return a1111.with_model_options(gen, options=server.options, engine=server.queue.engine,
                                    model_name=server.model_name)


def _library(request: Request) -> Any:
    """The engine's model library (None for engines without one, e.g. test doubles)."""
    return getattr(_server(request).queue.engine, "library", None)


async def _listing(request: Request, read: Callable[[Any], Any], *, without: Callable[[], Any]) -> Any:
    """A library route's answer: `read(library)` off the event loop, or `without()` when the engine
    has no model library."""
    library = _library(request)
    if library is None:
        return without()
    return await asyncio.to_thread(read, library)


def _refresh(request: Request, kind: str) -> None:
    """A `refresh-...` route: rescan one folder of the library (nothing to do without one)."""
    library = _library(request)
    if library is not None:
        library.refresh(kind)


@_route("GET", f"{API}/sd-models")
async def sd_models(request: Request) -> list:
    server = _server(request)
    model: dict[str, Any] = {"model_name": server.model_name, "model_hash": server.model_hash,
                             "source": server.model_source}
    return await _listing(request, lambda library: a1111.library_models(library, **model),
                          without=lambda: a1111.sd_models(**model))


@_route("POST", f"{API}/refresh-checkpoints")
async def refresh_checkpoints(request: Request) -> None:
    _refresh(request, "checkpoint")


@_route("GET", f"{API}/loras")
async def loras(request: Request) -> list:
    return await _listing(request, a1111.lora_list, without=list)


@_route("POST", f"{API}/refresh-loras")
async def refresh_loras(request: Request) -> None:
    _refresh(request, "lora")


@_route("GET", f"{API}/sd-vae")
async def sd_vae(request: Request) -> list:
    return await _listing(request, a1111.vae_list, without=list)


@_route("GET", f"{API}/samplers")
async def samplers() -> list:
    return a1111.samplers()


@_route("GET", f"{API}/schedulers")
async def schedulers() -> list:
    return a1111.schedulers()


@_route("GET", f"{API}/upscalers")
async def upscalers() -> list:
    return a1111.upscalers()


@_route("GET", f"{API}/latent-upscale-modes")
async def latent_upscale_modes() -> list:
    return a1111.latent_upscale_modes()


async def _empty_list() -> list:
    return []


for _path in ("hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles",
              "sd-modules"):
    _ROUTES.append(("GET", f"{API}/{_path}", _empty_list, _path))


@_route("GET", f"{API}/embeddings")
async def embeddings(request: Request) -> dict:
    store = getattr(_server(request).queue.engine, "embeddings", None)
    if store is None:
        return {"loaded": {}, "skipped": {}}
    store.library.refresh("embedding")  # A1111 rescans the folder when asked
    return await asyncio.to_thread(a1111.embedding_list, store)


@_route("GET", f"{API}/scripts")
async def scripts() -> dict:
    return {"txt2img": [], "img2img": []}


@_route("GET", f"{API}/memory")
async def memory() -> dict:
    return {"ram": {}, "cuda": {}}


@_route("POST", f"{API}/png-info")
async def png_info(body: PngInfoRequest) -> dict:
    return await asyncio.to_thread(a1111.png_info, body.image)


# ---- leansd's own queue view ----------------------------------------------------------------


@_route("GET", "/leansd/v1/queue")
async def queue_status(request: Request) -> dict:
    return _server(request).queue.status()


@_route("DELETE", "/leansd/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> dict:
    if not _server(request).queue.cancel(job_id):
        raise HTTPError(404, f"no queued or running job {job_id!r}", name="NotFound")
    return {"cancelled": job_id}


# ---------------------------------------------------------------------------------------------
# Helpers


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

    ImageWriter(folder).save_all(result.images, seeds=result.seeds, infotexts=result.infotexts)


# ---------------------------------------------------------------------------------------------
# Serving (used by `leansd serve`)


def serve(
    engine_or_queue: Any,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_queue: int = DEFAULT_MAX_QUEUE,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_SECONDS,
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

    max_job_seconds = app_options.pop("max_job_seconds", DEFAULT_MAX_JOB_SECONDS)
    queue = (engine_or_queue if isinstance(engine_or_queue, JobQueue)
             else JobQueue(engine_or_queue, max_queue=max_queue, max_job_seconds=max_job_seconds))
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
        stopped = queue.shutdown(shutdown_timeout)
    code = 0 if server.started else 1
    if not stopped:
        # The worker is still inside one long model call. Letting the interpreter finalise under a
        # thread that runs a torch kernel aborts the process (exit 134); everything else is done.
        logger.warning("the worker is still inside a model call; exiting without waiting for it")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


class _Stopped(Exception):
    """A stop signal arrived after uvicorn's graceful shutdown."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped(signum)
