"""Gradio web UI (txt2img, img2img, inpaint, PNG Info) over the same `JobQueue` as the HTTP API.

`build_ui(queue)` returns a `gr.Blocks`; `mount_ui(app, queue)` mounts it at `/` of the FastAPI
app built by `leansd.frontends.http.create_app`, so the page, `/sdapi/v1` and the Basic-auth /
Origin guard share one process, one worker and one queue. The controls fill the A1111 schema of
`leansd.frontends.a1111` and its builders (`txt2img_request`, `img2img_request`) make the
`GenerationRequest`, with uploads passed as PIL images, so the UI has the API's limits and error
messages; an `InvalidRequestError` becomes a `gr.Error` (a readable message in the page, and an
`AppError` for gradio_client). Every generate action has an
`api_name` (`txt2img`, `img2img`, `inpaint`) so it can be scripted with gradio_client.
The checkpoint and SD VAE dropdowns (`set_checkpoint`, `set_vae`, `refresh_checkpoints`) set A1111's
`sd_model_checkpoint` and `sd_vae` options as `POST /sdapi/v1/options` does: a checkpoint is loaded
at once by a job of the queue, the VAE by the following jobs.
Gradio is imported only here, lazily (importing it costs seconds); the page loads no remote fonts.
"""

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from leansd import request as defaults
from leansd.backends import BACKEND_HELP, BACKENDS
from leansd.errors import InvalidRequestError, LeansdError, one_line
from leansd.frontends.a1111 import INPAINTING_FILL, Limits, failure, preview_fields
from leansd.service.queue import Job, JobCancelledError, JobQueue, JobState

if TYPE_CHECKING:
    import gradio as gr
    from fastapi import FastAPI

    from leansd.request import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.25
# The page's "Masked content" labels -> A1111's inpainting_fill numbers (see a1111.INPAINTING_FILL).
MASKED_CONTENT = {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3}
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")  # A1111's resize_mode 0, 1, 2
CSS = ".leansd-progress {font-variant-numeric: tabular-nums; min-height: 1.6em}"


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio

    return gradio


def theme() -> Any:
    """Gradio's default look with system fonts only: nothing is fetched from a font CDN."""
    gr = _gradio()
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class _Runner:
    """The UI's side of the queue: submit, follow progress, cancel the session's job, save files."""

    def __init__(self, queue: JobQueue, *, model_name: str, limits: Limits, save_dir: Path | None,
                 options: dict[str, Any] | None = None) -> None:
        self.queue = queue
        self.options = {} if options is None else options  # shared with /sdapi/v1/options when served together
        self.taesd = getattr(queue.engine, "taesd", None) is not None
        self.model_name = model_name
        self.limits = limits
        self.save_dir = save_dir
        self._scratch: Path | None = None
        """Where downloads go when the server does not save (made at the first image, removed by cleanup)."""
        self._sessions: dict[str, str] = {}
        self._lock = threading.Lock()

    def build(self, builder: Callable[..., "GenerationRequest"], body: Any, **extra: Any) -> "GenerationRequest":
        """`builder(body, ..., **extra)` (a1111's txt2img_request/img2img_request); bad values -> gr.Error."""
        gr = _gradio()
        try:
            library = getattr(self.queue.engine, "library", None)  # refiner_checkpoint names one of its checkpoints
            request = builder(body, model_name=self.current_model(), limits=self.limits, library=library, **extra)
            request = dataclasses.replace(request, **preview_fields(self.options, taesd=self.taesd))
            return self.with_options(request)
        except InvalidRequestError as exc:
            raise gr.Error(one_line(exc), print_exception=False) from None

    def current_model(self) -> str:
        """The loaded model's name (a job may have switched the checkpoint since the UI was built)."""
        return getattr(getattr(self.queue.engine, "bundle", None), "name", None) or self.model_name

    def with_options(self, request: "GenerationRequest") -> "GenerationRequest":
        """`request` with the checkpoint and VAE of the A1111 options (`sd_model_checkpoint`, `sd_vae`),
        exactly as the HTTP API applies them: the engine switches inside the job."""
        from leansd.frontends.a1111 import with_model_options

        return with_model_options(request, options=self.options, engine=self.queue.engine,
                                  model_name=self.current_model())

    def set_checkpoint(self, choice: str | None) -> Iterator[str]:
        """Switch to checkpoint `choice` now: stored as /sdapi/v1/options stores `sd_model_checkpoint`,
        then loaded by a model-switch job of the queue (never racing a job); yields status lines.

        A failure raises gr.Error with one line; the previous model is loaded again by the engine and
        the option goes back to it, so the following jobs use it."""
        from leansd.frontends.a1111 import model_title, same_model, update_options

        gr = _gradio()
        engine = self.queue.engine
        loaded = self.current_model()
        if not choice or same_model(str(choice), loaded):
            yield f"Loaded: {loaded}"
            return
        bundle = getattr(engine, "bundle", None)
        previous = self.options.get("sd_model_checkpoint")
        try:
            update_options(self.options, {"sd_model_checkpoint": str(choice)}, model_name=loaded,
                           taesd=self.taesd, library=getattr(engine, "library", None))
            job = self.queue.submit_switch(str(self.options["sd_model_checkpoint"]))
        except LeansdError as exc:
            self.options["sd_model_checkpoint"] = previous
            raise gr.Error(one_line(exc), print_exception=False) from None
        try:
            while not job.future.done():
                if job.state is JobState.QUEUED:
                    yield f"Loading {choice}: " + progress_text(self.queue, job).lower()
                else:
                    yield f"Loading {choice}..."
                _wait(job.future, POLL_SECONDS)
            job.future.result()
        except Exception as exc:  # noqa: BLE001 - the load failed or was cancelled: say why in one line
            now = getattr(engine, "bundle", None) or bundle
            self.options["sd_model_checkpoint"] = model_title(now.name, now.hash) if now is not None else previous
            message = "cancelled" if isinstance(exc, JobCancelledError) else failure(exc)[1]
            raise gr.Error(f"loading {choice} failed: {message}", print_exception=False) from None
        seconds = (job.finished or 0) - (job.started or 0)
        yield f"Loaded: {self.current_model()}" + (f" ({seconds:.1f} s)" if seconds > 0 else "")

    def run(self, request: "GenerationRequest", *, task: str, session: str | None) -> Iterator[tuple]:
        """Yield (gallery, infotext, files, progress) updates until the job ends; errors -> gr.Error.

        While the job runs the gallery shows its latest live preview (only this session's job is
        followed, so a session never sees another's); when it ends the preview goes: the results
        replace it, or on failure and cancel the gallery is emptied before the error is shown."""
        gr = _gradio()
        try:
            job = self.queue.submit(request)
        except LeansdError as exc:
            raise gr.Error(one_line(exc), print_exception=False) from None
        if session:
            with self._lock:
                self._sessions[session] = job.id
        shown = 0  # preview_id of the preview in the gallery (0: none)
        try:
            while not job.future.done():
                preview, preview_id = job.preview, job.preview_id
                gallery = gr.skip()
                if preview is not None and preview_id != shown:
                    gallery, shown = [(preview, f"Preview, step {job.progress.step}/{job.progress.total_steps}")], preview_id
                yield gallery, gr.skip(), gr.skip(), progress_text(self.queue, job)
                _wait(job.future, POLL_SECONDS)
            try:
                result = job.future.result()
            except Exception as exc:  # noqa: BLE001 - the job failed or was cancelled; say why in one line
                if shown:  # a preview never outlives its job
                    yield [], gr.skip(), gr.skip(), ""
                message = "cancelled" if isinstance(exc, JobCancelledError) else failure(exc)[1]
                raise gr.Error(message, print_exception=False) from None
        finally:
            if not job.future.done():
                # The browser closed its stream (the generator was closed): stop the job, as the
                # HTTP API does when its client goes away.
                self.queue.cancel(job.id)
                logger.info("web UI client went away: cancelled job %s", job.id)
            if session:
                with self._lock:
                    if self._sessions.get(session) == job.id:
                        del self._sessions[session]
        paths = self.save(result, task=task)
        gallery = [(str(path), info) for path, info in zip(paths, result.infotexts, strict=True)]
        seconds = result.timings.get("total")
        done = f"{len(paths)} image{'s' * (len(paths) != 1)}" + (f" in {seconds:.1f} s" if seconds else "")
        if job.interrupted:
            done += " (interrupted)"
        yield gallery, "\n\n".join(result.infotexts), [str(p) for p in paths], done

    def cleanup(self) -> None:
        """Remove the scratch folder of this UI's downloads (at server shutdown)."""
        with self._lock:
            scratch, self._scratch = self._scratch, None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    def cancel(self, session: str | None) -> str:
        with self._lock:
            job_id = self._sessions.get(session or "")
        if job_id is None or not self.queue.cancel(job_id):
            return "nothing to cancel"
        return "cancelling..."

    def save(self, result: "GenerationResult", *, task: str) -> list[Path]:
        """PNGs with their infotext (downloads keep the parameters); into save_dir when the server saves."""
        from leansd.outputs.writer import ImageWriter

        base = self.save_dir
        if base is None:
            with self._lock:
                if self._scratch is None:
                    self._scratch = Path(tempfile.mkdtemp(prefix="leansd-webui-"))
                base = self._scratch
        folder = base / f"{task}-images"
        return ImageWriter(folder).save_all(result.images, seeds=result.seeds, infotexts=result.infotexts)


def _wait(future: Any, timeout: float) -> None:
    try:
        future.exception(timeout=timeout)
    except Exception:  # noqa: BLE001 - only waiting here; the result is read by the caller
        pass


def progress_text(queue: JobQueue, job: Job) -> str:
    """`Step 3/20 · batch 1/2 · 40% · ETA 2.1 s`, or the place in the queue while waiting."""
    if job.state is JobState.QUEUED:
        waiting = queue.waiting()
        ahead = waiting.index(job) if job in waiting else 0
        ahead += queue.current is not None
        return f"Waiting in the queue ({ahead} job{'s' * (ahead != 1)} ahead)"
    p = job.progress
    if not p.total_steps:
        return "Starting..."
    eta = "ETA ..." if p.eta_seconds is None else f"ETA {p.eta_seconds:.1f} s"
    return (f"Step {p.step}/{p.total_steps} · batch {p.batch_index + 1}/{p.n_batches} · "
            f"{p.fraction:.0%} · {eta}")


def editor_mask(value: Any) -> Any:
    """An ImageEditor value -> the "L" mask of everything painted on its layers (white = repaint), or None."""
    from PIL import Image

    if not value:
        return None
    layers = [layer for layer in value.get("layers") or [] if layer is not None]
    background = value.get("background")
    if not layers or background is None:
        return None
    size = Image.open(background).size if isinstance(background, (str, Path)) else background.size
    mask = Image.new("L", size, 0)
    for layer in layers:
        image = Image.open(layer) if isinstance(layer, (str, Path)) else layer
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        mask.paste(255, (0, 0), alpha.point(lambda a: 255 if a > 0 else 0))
    return mask if mask.getbbox() else None


def memory_text(queue: JobQueue) -> str:
    """A read-only view of the engine's device, precision, VRAM budget and last memory plan."""
    engine = queue.engine
    budget = getattr(engine, "budget", None)
    plan = getattr(engine, "plan", None)
    precision = getattr(getattr(engine, "precision", None), "name", None)
    lines = [
        f"- **Device:** {getattr(engine, 'device', 'n/a')}",
        f"- **Precision:** {precision or 'n/a'}",
        f"- **VRAM budget:** {'none (no limit)' if budget is None else f'{budget >> 20} MiB'}",
        f"- **Memory policy:** {getattr(engine, 'memory_policy', 'n/a')}",
        f"- **Compute backend:** {getattr(getattr(engine, 'backend', None), 'name', 'n/a')}",
        f"- **Last memory plan:** {plan.describe() if plan is not None else 'none yet'}",
        "",
        "Change the budget above (it applies from the next model stage) or when the server starts "
        "(`leansd serve --vram 4G`, `--medvram`, `--lowvram`).",
    ]
    return "\n".join(lines)


def add_to_prompt(prompt: str | None, text: str) -> str:
    """`prompt` with `text` appended (a LoRA tag or an embedding name), separated by ", " when needed."""
    prompt = prompt or ""
    if not text:
        return prompt
    if not prompt.strip():
        return text
    return prompt + ("" if prompt.rstrip().endswith(",") and prompt.endswith(" ") else
                     " " if prompt.rstrip().endswith(",") else ", ") + text


def library_choices(engine: Any) -> tuple[list[str], list[str]]:
    """(LoRA names, embedding names) of the engine's model library; empty without one."""
    library = getattr(engine, "library", None)
    if library is None:
        return [], []
    return library.names("lora"), library.names("embedding")


def checkpoint_choices(engine: Any) -> tuple[list[str], str]:
    """(A1111 titles of the loaded model and the library's checkpoints, the loaded one's title), as
    `GET /sdapi/v1/sd-models` lists them."""
    from leansd.frontends.a1111 import library_models, sd_models

    bundle = getattr(engine, "bundle", None)
    name, model_hash = getattr(bundle, "name", None) or "model", getattr(bundle, "hash", None)
    source = str(getattr(bundle, "source", None) or name)
    library = getattr(engine, "library", None)
    if library is None:
        models = sd_models(model_name=name, model_hash=model_hash, source=source)
    else:
        models = library_models(library, model_name=name, model_hash=model_hash, source=source)
    return [m["title"] for m in models], models[0]["title"]


def refiner_choices(engine: Any) -> list[str]:
    """The refiner dropdown: "None" and the library's checkpoints by name (A1111's refiner_checkpoint choices)."""
    library = getattr(engine, "library", None)
    return ["None"] + ([] if library is None else library.names("checkpoint"))


def vae_choices(engine: Any) -> list[str]:
    """A1111's `sd_vae` choices: "Automatic", "None" and the VAE folder's files (as `GET /sd-vae`)."""
    from leansd.frontends.a1111 import vae_list

    library = getattr(engine, "library", None)
    return ["Automatic", "None"] + ([] if library is None else [v["model_name"] for v in vae_list(library)])


def build_ui(
    queue: JobQueue,
    *,
    limits: Limits | None = None,
    model_name: str | None = None,
    save_dir: "str | os.PathLike[str] | None" = None,
    options: dict[str, Any] | None = None,
    cleanups: "list[Callable[[], None]] | None" = None,
) -> "gr.Blocks":
    """The web UI's Blocks over `queue` (its worker owns the engine); mount it with `mount_ui`.

    Live previews follow `options` (A1111's preview options; default: A1111's defaults).
    `cleanups`: a list to which the UI adds what must run at server shutdown (removing its
    scratch folder of downloads)."""
    _gradio()
    import gradio as gr  # the module itself: handlers' `gr.Request` annotations are read by gradio

    from leansd.frontends.a1111 import (
        DEFAULT_RESIZE_MODE,
        PREDICTION_OPTION_VALUES,
        Img2ImgRequest,
        Txt2ImgRequest,
        img2img_request,
        load_upload,
        native_size,
        txt2img_request,
    )
    from leansd.outputs.infotext import parse_infotext
    from leansd.outputs.writer import read_infotext
    from leansd.sampling.samplers import sampler_names

    limits = limits or Limits()
    bundle = getattr(queue.engine, "bundle", None)
    model_name = model_name or getattr(bundle, "name", None) or "model"
    model_size = native_size(queue.engine)  # the library's default size for this model
    native = model_size or (None, None)
    masked_content = {number: label for label, number in MASKED_CONTENT.items()}
    default_fill = masked_content[{v: k for k, v in INPAINTING_FILL.items()}[defaults.DEFAULT_INPAINTING_FILL]]
    runner = _Runner(queue, model_name=model_name, limits=limits,
                     save_dir=None if save_dir is None else Path(save_dir).resolve(), options=options)
    samplers = sampler_names()
    max_batch = min(8, limits.max_images)

    def settings(prefix: str, *, from_image: bool = False) -> dict[str, Any]:
        """The A1111 controls every tab has: prompts, sampler, steps, CFG, size, batches, seed.

        With `from_image` (img2img, inpaint) a size of 0, the default, keeps the init image's size
        (rounded down to 8), as the library does without width/height; txt2img starts at the
        model's native size.
        """
        c: dict[str, Any] = {}
        c["prompt"] = gr.Textbox(label="Prompt", lines=3, placeholder="a photograph of an astronaut riding a horse",
                                 elem_id=f"{prefix}_prompt")
        c["negative"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{prefix}_negative_prompt")
        loras, embeddings = library_choices(queue.engine)
        with gr.Accordion("LoRA and embeddings", open=False):
            with gr.Row(equal_height=True):
                c["lora"] = gr.Dropdown(loras, value=None, label="LoRA (adds <lora:NAME:1>)",
                                        elem_id=f"{prefix}_lora", scale=3)
                c["add_lora"] = gr.Button("Add to prompt", size="sm", elem_id=f"{prefix}_add_lora", scale=1)
            with gr.Row(equal_height=True):
                c["embedding"] = gr.Dropdown(embeddings, value=None, label="Embedding",
                                             elem_id=f"{prefix}_embedding", scale=3)
                c["add_embedding"] = gr.Button("Add to prompt", size="sm", elem_id=f"{prefix}_add_embedding",
                                               scale=1)
                c["add_negative_embedding"] = gr.Button("Add to negative", size="sm",
                                                        elem_id=f"{prefix}_add_negative_embedding", scale=1)
            c["refresh_networks"] = gr.Button("Refresh lists", size="sm", elem_id=f"{prefix}_refresh_networks")
        c["add_lora"].click(lambda p, name: add_to_prompt(p, f"<lora:{name}:1>" if name else ""),
                            [c["prompt"], c["lora"]], c["prompt"], api_name=False, queue=False)
        c["add_embedding"].click(lambda p, name: add_to_prompt(p, name or ""), [c["prompt"], c["embedding"]],
                                 c["prompt"], api_name=False, queue=False)
        c["add_negative_embedding"].click(lambda p, name: add_to_prompt(p, name or ""),
                                          [c["negative"], c["embedding"]], c["negative"], api_name=False,
                                          queue=False)

        def refresh_networks() -> tuple:
            library = getattr(queue.engine, "library", None)
            if library is not None:
                library.refresh("lora")
                library.refresh("embedding")
            new_loras, new_embeddings = library_choices(queue.engine)
            return gr.update(choices=new_loras), gr.update(choices=new_embeddings)

        c["refresh_networks"].click(refresh_networks, None, [c["lora"], c["embedding"]], api_name=False,
                                    queue=False)
        with gr.Row():
            c["sampler"] = gr.Dropdown(samplers, value=defaults.DEFAULT_SAMPLER, label="Sampling method",
                                       elem_id=f"{prefix}_sampler")
            c["steps"] = gr.Slider(1, limits.max_steps, value=defaults.DEFAULT_STEPS, step=1, label="Sampling steps",
                                   elem_id=f"{prefix}_steps")
        with gr.Row():
            for side, value in (("width", native[0]), ("height", native[1])):
                c[side] = gr.Slider(
                    0 if from_image else defaults.MIN_SIZE, limits.max_size, value=0 if from_image else value, step=8,
                    label=side.capitalize() + (" (0: the image's)" if from_image else ""), elem_id=f"{prefix}_{side}",
                )
        with gr.Row():
            c["n_iter"] = gr.Slider(1, max(1, limits.max_images), value=defaults.DEFAULT_N_ITER, step=1,
                                    label="Batch count", elem_id=f"{prefix}_batch_count")
            c["batch_size"] = gr.Slider(1, max_batch, value=defaults.DEFAULT_BATCH_SIZE, step=1, label="Batch size",
                                        elem_id=f"{prefix}_batch_size")
        c["cfg"] = gr.Slider(1.0, 30.0, value=defaults.DEFAULT_GUIDANCE, step=0.5, label="CFG scale",
                             elem_id=f"{prefix}_cfg_scale")
        with gr.Accordion("Refiner (SDXL)", open=False):
            with gr.Row():
                c["refiner"] = gr.Dropdown(refiner_choices(queue.engine), value="None", label="Refiner checkpoint",
                                           elem_id=f"{prefix}_refiner_checkpoint")
                c["switch_at"] = gr.Slider(0.01, 1.0, value=defaults.DEFAULT_REFINER_SWITCH_AT, step=0.01,
                                           label="Switch at (fraction of the steps the base runs)",
                                           elem_id=f"{prefix}_refiner_switch_at")
        with gr.Row(equal_height=True):
            c["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id=f"{prefix}_seed",
                                  scale=4)
            c["random_seed"] = gr.Button("Random", elem_id=f"{prefix}_random_seed", size="sm", scale=1)
            c["reuse_seed"] = gr.Button("Reuse last", elem_id=f"{prefix}_reuse_seed", size="sm", scale=1)
        with gr.Accordion("Advanced", open=False):
            c["guidance_rescale"] = gr.Slider(
                0.0, 1.0, value=defaults.DEFAULT_GUIDANCE_RESCALE, step=0.05, label="CFG rescale (guidance_rescale)",
                info="0 = off; rescales the guided prediction's spread to the conditional one's (helps "
                     "v-prediction / zero-terminal-SNR models at high CFG)", elem_id=f"{prefix}_guidance_rescale")
        return c

    def results(prefix: str) -> dict[str, Any]:
        c: dict[str, Any] = {}
        with gr.Row():
            c["generate"] = gr.Button("Generate", variant="primary", elem_id=f"{prefix}_generate", scale=3)
            c["cancel"] = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}_cancel", scale=1)
        c["progress"] = gr.Markdown("", elem_id=f"{prefix}_progress", elem_classes="leansd-progress")
        c["gallery"] = gr.Gallery(label="Results", columns=2, height="auto", object_fit="contain",
                                  buttons=["download", "fullscreen"], elem_id=f"{prefix}_gallery",
                                  interactive=False)
        c["infotext"] = gr.Textbox(label="Generation parameters (infotext)", lines=4, interactive=False,
                                   buttons=["copy"], elem_id=f"{prefix}_infotext")
        c["files"] = gr.File(label="Download PNGs (with parameters)", file_count="multiple", interactive=False,
                             elem_id=f"{prefix}_files")
        return c

    def wire_common(c: dict[str, Any], r: dict[str, Any], event: Any) -> None:
        c["random_seed"].click(lambda: -1, None, c["seed"], api_visibility="private", queue=False)
        c["reuse_seed"].click(reuse_seed, r["infotext"], c["seed"], api_visibility="private", queue=False)
        r["cancel"].click(cancel, None, r["progress"], api_visibility="private", queue=False)

    def reuse_seed(infotext: str) -> int:
        if not infotext:
            raise gr.Error("generate an image first: its seed is reused", print_exception=False)
        seed = parse_infotext(infotext.split("\n\n")[0]).get("Seed")
        if seed is None:
            raise gr.Error("the infotext holds no seed", print_exception=False)
        return int(seed)

    def cancel(request: gr.Request) -> str:
        return runner.cancel(getattr(request, "session_hash", None))

    def common_body(prompt: str, negative: str, sampler: str, steps: Any, cfg: Any, width: Any, height: Any,
                    n_iter: Any, batch_size: Any, seed: Any, rescale: Any, *,
                    from_image: bool = False) -> dict[str, Any]:
        def integer(name: str, value: Any) -> int:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise gr.Error(f"{name} must be a number, got {value!r}", print_exception=False) from None
            if number != int(number):
                raise gr.Error(f"{name} must be a whole number, got {value}", print_exception=False)
            return int(number)

        def number(name: str, value: Any, default: float) -> float:
            if value is None:
                return default
            try:
                return float(value)
            except (TypeError, ValueError):
                raise gr.Error(f"{name} must be a number, got {value!r}", print_exception=False) from None

        def size(name: str, value: Any) -> int | None:
            number = integer(name, value)
            return None if from_image and number == 0 else number

        return dict(
            prompt=prompt or "", negative_prompt=negative or "", sampler_name=sampler or None,
            steps=integer("steps", steps), cfg_scale=float(cfg), width=size("width", width),
            height=size("height", height), n_iter=integer("batch count", n_iter),
            batch_size=integer("batch size", batch_size), seed=-1 if seed is None else integer("seed", seed),
            guidance_rescale=number("CFG rescale", rescale, defaults.DEFAULT_GUIDANCE_RESCALE),
        )

    def refiner_body(refiner: Any, switch_at: Any) -> dict[str, Any]:
        return dict(refiner_checkpoint=refiner or None, refiner_switch_at=float(switch_at))

    def txt2img(prompt, negative, sampler, steps, cfg, width, height, n_iter, batch_size, seed,
                rescale, refiner, switch_at, request: gr.Request):
        body = Txt2ImgRequest(**common_body(prompt, negative, sampler, steps, cfg, width, height, n_iter,
                                            batch_size, seed, rescale), **refiner_body(refiner, switch_at))
        gen = runner.build(txt2img_request, body, native_size=model_size)
        yield from runner.run(gen, task="txt2img", session=getattr(request, "session_hash", None))

    def img2img(init_image, prompt, negative, sampler, steps, cfg, width, height, n_iter, batch_size, seed,
                strength, resize_mode, rescale, refiner, switch_at, request: gr.Request):
        if not init_image:
            raise gr.Error("upload an image to transform first", print_exception=False)
        body = Img2ImgRequest(
            **common_body(prompt, negative, sampler, steps, cfg, width, height, n_iter, batch_size, seed, rescale,
                          from_image=True),
            denoising_strength=float(strength),
            resize_mode=RESIZE_MODES.index(resize_mode) if resize_mode in RESIZE_MODES else DEFAULT_RESIZE_MODE,
            **refiner_body(refiner, switch_at),
        )
        gen = runner.build(img2img_request, body, init_image=upload(init_image, label="image"))
        yield from runner.run(gen, task="img2img", session=getattr(request, "session_hash", None))

    def inpaint(editor, mask_upload, prompt, negative, sampler, steps, cfg, width, height, n_iter, batch_size,
                seed, strength, mask_blur, masked_content, invert, rescale, refiner, switch_at,
                request: gr.Request):
        background = (editor or {}).get("background")
        if background is None:
            raise gr.Error("upload an image to inpaint first", print_exception=False)
        if mask_upload:
            mask = upload(mask_upload, label="mask", mask=True)
        else:
            mask = editor_mask(editor)
            if mask is None:
                raise gr.Error("paint the area to regenerate on the image with the brush, or upload a mask",
                               print_exception=False)
        init = (upload(background, label="image") if isinstance(background, (str, Path))
                else background.convert("RGB"))
        body = Img2ImgRequest(
            **common_body(prompt, negative, sampler, steps, cfg, width, height, n_iter, batch_size, seed, rescale,
                          from_image=True),
            denoising_strength=float(strength),
            mask_blur=int(mask_blur), inpainting_fill=MASKED_CONTENT.get(masked_content, MASKED_CONTENT[default_fill]),
            inpainting_mask_invert=int(bool(invert)),
            **refiner_body(refiner, switch_at),
        )
        gen = runner.build(img2img_request, body, init_image=init, mask=mask)
        yield from runner.run(gen, task="inpaint", session=getattr(request, "session_hash", None))

    def upload(path: Any, *, label: str, mask: bool = False) -> Any:
        """An uploaded file -> a PIL image with the API's checks; a bad upload -> gr.Error."""
        try:
            return load_upload(path, label=label, mask=mask)
        except InvalidRequestError as exc:
            raise gr.Error(one_line(exc), print_exception=False) from None

    def prediction_now() -> str:
        from leansd.frontends.a1111 import PREDICTION_OPTION, prediction_label

        return str(runner.options.get(PREDICTION_OPTION)
                   or prediction_label(getattr(queue.engine, "prediction_choice", "auto")))

    def png_info(path: str | None) -> tuple[str, dict]:
        if not path:
            return "", {}
        text = read_infotext(Path(path))
        if not text:
            return "(this image holds no generation parameters)", {}
        return text, parse_infotext(text)

    outputs_of = lambda r: [r["gallery"], r["infotext"], r["files"], r["progress"]]  # noqa: E731

    # delete_cache: Gradio's copies of uploads are removed after an hour and when the server stops.
    with gr.Blocks(title="leansd", analytics_enabled=False, delete_cache=(3600, 3600)) as ui:
        gr.Markdown(f"## leansd · `{model_name}`")
        titles, loaded_title = checkpoint_choices(queue.engine)
        vae_now = str(runner.options.get("sd_vae") or getattr(queue.engine, "vae_choice", "Automatic"))
        with gr.Row(equal_height=True):
            checkpoint = gr.Dropdown(titles, value=loaded_title, label="Stable Diffusion checkpoint",
                                     elem_id="setting_sd_model_checkpoint", scale=4)
            refresh_models = gr.Button("Refresh", size="sm", elem_id="refresh_sd_model_checkpoint", scale=1)
            vae = gr.Dropdown(vae_choices(queue.engine), value=vae_now, label="SD VAE (used from the next job)",
                              elem_id="setting_sd_vae", scale=3)
            prediction = gr.Dropdown(list(PREDICTION_OPTION_VALUES), value=prediction_now(), elem_id="setting_prediction_type",
                                     label="Prediction type (reloads the checkpoint at the next job)", scale=2)
        model_status = gr.Markdown("", elem_id="sd_model_status", elem_classes="leansd-progress")

        def model_lists() -> tuple:
            titles, loaded_title = checkpoint_choices(queue.engine)
            vae_now = str(runner.options.get("sd_vae") or getattr(queue.engine, "vae_choice", "Automatic"))
            return gr.update(choices=titles, value=loaded_title), gr.update(choices=vae_choices(queue.engine),
                                                                            value=vae_now)

        def refresh_model_lists() -> tuple:
            library = getattr(queue.engine, "library", None)
            if library is not None:
                library.refresh("checkpoint")
                library.refresh("vae")
            return model_lists()

        def switch_checkpoint(choice: str | None) -> Iterator[tuple]:
            line = ""
            try:
                for line in runner.set_checkpoint(choice):
                    yield line, gr.skip()
            except gr.Error:
                yield "", model_lists()[0]  # the dropdown shows the model in use again
                raise
            yield line, model_lists()[0]

        def set_prediction(choice: str | None) -> str:
            from leansd.frontends.a1111 import PREDICTION_OPTION, update_options

            try:
                update_options(runner.options, {PREDICTION_OPTION: choice}, model_name=runner.current_model(),
                               taesd=runner.taesd, library=getattr(queue.engine, "library", None))
            except InvalidRequestError as exc:
                raise gr.Error(one_line(exc), print_exception=False) from None
            return f"Prediction type: {runner.options[PREDICTION_OPTION]} (from the next job)"

        def set_vae(choice: str | None) -> str:
            from leansd.frontends.a1111 import update_options

            if choice not in vae_choices(queue.engine):
                raise gr.Error(f"unknown VAE {choice!r}: choose Automatic, None or a file of the VAE folder",
                               print_exception=False)
            try:
                update_options(runner.options, {"sd_vae": choice}, model_name=runner.current_model(),
                               taesd=runner.taesd, library=getattr(queue.engine, "library", None))
            except InvalidRequestError as exc:
                raise gr.Error(one_line(exc), print_exception=False) from None
            return f"VAE: {choice} (from the next job)"

        checkpoint.input(switch_checkpoint, checkpoint, [model_status, checkpoint], api_name="set_checkpoint",
                         show_progress="minimal", concurrency_limit=None)
        vae.input(set_vae, vae, model_status, api_name="set_vae", queue=False)
        prediction.input(set_prediction, prediction, model_status, api_name="set_prediction_type", queue=False)
        refresh_models.click(refresh_model_lists, None, [checkpoint, vae], api_name="refresh_checkpoints",
                             queue=False)
        ui.load(model_lists, None, [checkpoint, vae], api_visibility="private", queue=False)
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                with gr.Row():
                    with gr.Column():
                        t = settings("txt2img")
                    with gr.Column():
                        tr = results("txt2img")
                t_inputs = [t["prompt"], t["negative"], t["sampler"], t["steps"], t["cfg"], t["width"],
                            t["height"], t["n_iter"], t["batch_size"], t["seed"], t["guidance_rescale"], t["refiner"],
                            t["switch_at"]]
                event = tr["generate"].click(txt2img, t_inputs, outputs_of(tr), api_name="txt2img",
                                             show_progress="minimal", concurrency_limit=None)
                wire_common(t, tr, event)
            with gr.Tab("img2img", id="img2img"):
                with gr.Row():
                    with gr.Column():
                        i_image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                           elem_id="img2img_image")
                        i = settings("img2img", from_image=True)
                        with gr.Row():
                            i_strength = gr.Slider(0.0, 1.0, value=defaults.DEFAULT_STRENGTH, step=0.01,
                                                   label="Denoising strength", elem_id="img2img_denoising_strength")
                            i_resize = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[DEFAULT_RESIZE_MODE],
                                                label="Resize mode", elem_id="img2img_resize_mode")
                    with gr.Column():
                        ir = results("img2img")
                i_inputs = [i_image, i["prompt"], i["negative"], i["sampler"], i["steps"], i["cfg"], i["width"],
                            i["height"], i["n_iter"], i["batch_size"], i["seed"], i_strength, i_resize,
                            i["guidance_rescale"], i["refiner"], i["switch_at"]]
                event = ir["generate"].click(img2img, i_inputs, outputs_of(ir), api_name="img2img",
                                             show_progress="minimal", concurrency_limit=None)
                wire_common(i, ir, event)
            with gr.Tab("inpaint", id="inpaint"):
                with gr.Row():
                    with gr.Column():
                        p_editor = gr.ImageEditor(
                            label="Image: paint the area to regenerate", type="filepath", format="png",
                            image_mode="RGBA", sources=["upload", "clipboard"], transforms=(), layers=False,
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="inpaint_editor",
                        )
                        p_mask = gr.Image(label="Mask (optional upload: white = regenerate)", type="filepath",
                                          image_mode=None, sources=["upload"], elem_id="inpaint_mask")
                        p = settings("inpaint", from_image=True)
                        with gr.Row():
                            p_strength = gr.Slider(0.0, 1.0, value=defaults.DEFAULT_STRENGTH, step=0.01,
                                                   label="Denoising strength", elem_id="inpaint_denoising_strength")
                            p_blur = gr.Slider(0, defaults.MAX_MASK_BLUR, value=defaults.DEFAULT_MASK_BLUR, step=1,
                                               label="Mask blur", elem_id="inpaint_mask_blur")
                        with gr.Row():
                            p_fill = gr.Radio(list(MASKED_CONTENT), value=default_fill, label="Masked content",
                                              elem_id="inpaint_masked_content")
                            p_invert = gr.Checkbox(False, label="Invert mask (regenerate the unpainted part)",
                                                   elem_id="inpaint_invert")
                    with gr.Column():
                        pr = results("inpaint")
                p_inputs = [p_editor, p_mask, p["prompt"], p["negative"], p["sampler"], p["steps"], p["cfg"],
                            p["width"], p["height"], p["n_iter"], p["batch_size"], p["seed"], p_strength, p_blur,
                            p_fill, p_invert, p["guidance_rescale"], p["refiner"], p["switch_at"]]
                event = pr["generate"].click(inpaint, p_inputs, outputs_of(pr), api_name="inpaint",
                                             show_progress="minimal", concurrency_limit=None)
                wire_common(p, pr, event)
            with gr.Tab("PNG Info", id="pnginfo"):
                with gr.Row():
                    with gr.Column():
                        n_image = gr.Image(label="Image", type="filepath", image_mode=None,
                                           sources=["upload", "clipboard"], elem_id="pnginfo_image")
                    with gr.Column():
                        n_text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo_text")
                        n_json = gr.JSON(label="Parsed", elem_id="pnginfo_json")
                        with gr.Row():
                            to_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")
                            to_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_img2img")
                n_image.change(png_info, n_image, [n_text, n_json], api_name="png_info")
        with gr.Accordion("Settings: memory", open=False):
            memory = gr.Markdown(memory_text(queue), elem_id="memory_settings")
            with gr.Row():
                vram_box = gr.Textbox(label="VRAM budget", placeholder="e.g. 4G, 1500M, auto, none",
                                      elem_id="vram_budget", scale=3)
                apply_vram = gr.Button("Apply", size="sm", elem_id="vram_apply", scale=1)
            gr.Button("Refresh", size="sm").click(lambda: memory_text(queue), None, memory, api_visibility="private",
                                                  queue=False)

            def set_vram(text):
                try:
                    queue.engine.set_budget(str(text).strip() or "auto")
                except LeansdError as exc:
                    raise gr.Error(one_line(exc), print_exception=False) from None
                return memory_text(queue)

            apply_vram.click(set_vram, vram_box, memory, api_name="set_vram")
            with gr.Row():
                backend_box = gr.Dropdown(list(BACKENDS), value=getattr(getattr(queue.engine, "backend", None), "name", None),
                                          label="Compute backend", info=BACKEND_HELP, elem_id="compute_backend", scale=3)
                apply_backend = gr.Button("Apply", size="sm", elem_id="backend_apply", scale=1)

            def set_backend(name):
                if not hasattr(queue.engine, "set_backend"):
                    raise gr.Error("this server's models run on Ray replicas: choose the backend when it starts "
                                   "(leansd serve --backend)", print_exception=False)
                try:
                    queue.engine.set_backend(str(name or "auto"), convert=False)
                except LeansdError as exc:
                    raise gr.Error(one_line(exc), print_exception=False) from None
                return memory_text(queue)

            apply_backend.click(set_backend, backend_box, memory, api_name="set_backend")

        def send(target: dict[str, Any]) -> list:
            return [target["prompt"], target["negative"], target["sampler"], target["steps"], target["cfg"],
                    target["seed"], target["width"], target["height"]]

        def send_values(parsed: dict | None, tab: str) -> list:
            if not parsed:
                raise gr.Error("drop an image with generation parameters first", print_exception=False)
            size = str(parsed.get("Size", "")).split("x")
            updates = [parsed.get("Prompt", ""), parsed.get("Negative prompt", "")]
            sampler = parsed.get("Sampler")
            updates.append(sampler if sampler in samplers else gr.skip())
            for key, cast in (("Steps", int), ("CFG scale", float), ("Seed", int)):
                try:
                    updates.append(cast(parsed[key]))
                except (KeyError, ValueError):
                    updates.append(gr.skip())
            if len(size) == 2 and all(s.isdigit() for s in size):
                updates += [int(size[0]), int(size[1])]
            else:
                updates += [gr.skip(), gr.skip()]
            return updates + [gr.Tabs(selected=tab)]

        to_txt2img.click(lambda parsed: send_values(parsed, "txt2img"), n_json, send(t) + [tabs], api_visibility="private")
        to_img2img.click(lambda parsed, path: send_values(parsed, "img2img") + [path], [n_json, n_image],
                         send(i) + [tabs, i_image], api_visibility="private")
    if cleanups is not None:
        cleanups.append(runner.cleanup)  # removes the scratch folder of downloads
    return ui


def mount_ui(app: "FastAPI", queue: JobQueue, *, limits: Limits | None = None, model_name: str | None = None,
             save_dir: "str | os.PathLike[str] | None" = None, path: str = "/",
             max_file_size: int | None = None, options: dict[str, Any] | None = None) -> "FastAPI":
    """Mount the web UI at `path` of `app` (routes added before it, such as /sdapi/v1, keep precedence).

    `max_file_size`: uploads above it (bytes) are refused. The UI's temporary files are removed at
    shutdown when `app.state.cleanups` exists (apps from `create_app` run that list). `options`: the
    server's A1111 options (shared with `/sdapi/v1/options`: the live preview settings).
    """
    gr = _gradio()
    ui = build_ui(queue, limits=limits, model_name=model_name, save_dir=save_dir, options=options,
                  cleanups=getattr(app.state, "cleanups", None))
    ui.queue(default_concurrency_limit=None, max_size=None)
    return gr.mount_gradio_app(
        app, ui, path=path, theme=theme(), css=CSS, ssr_mode=False, mcp_server=False, pwa=False,
        footer_links=["api"], show_error=True, max_file_size=max_file_size,
    )
