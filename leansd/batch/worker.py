"""A batch worker: owns one Engine at a time and turns a job line into finished PNG files' bytes.

The same class runs in-process (`leansd batch`) and inside a Ray actor (`--ray`), so both make the
same pixels: the line's request is rebuilt from its body, generated, and every image is encoded to
PNG (A1111 infotext inside) here, on the worker; the driver only writes bytes and the manifest.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from leansd.errors import one_line

logger = logging.getLogger(__name__)


@dataclass
class ImageOutcome:
    k: int
    seed: int
    png: bytes | None
    error: str | None = None


@dataclass
class LineResult:
    """What a worker sends back for one job line."""

    id: str
    images: list[ImageOutcome]
    model: str | None
    model_hash: str | None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    worker: str = ""
    vae: str | None = None
    """The VAE file the images were decoded with (None: the checkpoint's own)."""
    vae_hash: str | None = None


def describe_error(exc: BaseException) -> str:
    from leansd.errors import is_out_of_memory

    if is_out_of_memory(exc):
        return f"out of memory: {one_line(exc, limit=200)}"
    from leansd.errors import LeansdError

    if isinstance(exc, LeansdError):
        return one_line(exc, limit=300)
    return f"{type(exc).__name__}: {one_line(exc, limit=300)}"


class BatchWorker:
    """Generates job lines with one Engine, loading another only when a line names another model.

    `engine_options`: keyword arguments of `Engine.load` (device, precision, prompt_cache, vram,
    memory_policy, ...). `load`: how to load a model (tests may pass a function returning an
    Engine they built); defaults to `Engine.load`. `vae`: the VAE of every line that names none in
    `override_settings.sd_vae` (`--vae`: "Automatic", "None", a file or a VAE-folder name); set
    for each line, so a line's own choice never leaks into the next one.
    """

    def __init__(self, *, engine_options: dict[str, Any] | None = None,
                 load: "Callable[..., Any] | None" = None, name: str = "local", vae: str = "Automatic") -> None:
        self.engine_options = dict(engine_options or {})
        self._load = load
        self.name = name
        self.vae = vae
        self.engine: Any = None
        self.model: str | None = None
        self.loads = 0

    def engine_for(self, model: str) -> Any:
        if self.engine is None or self.model != model:
            self.engine = None  # free the previous model before loading the next
            gc.collect()
            if self._load is not None:
                self.engine = self._load(model, **self.engine_options)
            else:
                from leansd.engine.engine import Engine

                self.engine = Engine.load(model, **self.engine_options)
            self.model = model
            self.loads += 1
        return self.engine

    def run(self, line: Any) -> LineResult:
        """Generate every image of `line` (a JobLine); a failure is returned, never raised."""
        from leansd.batch.manifest import encode_png

        started = time.perf_counter()
        seeds = [line.seed + k for k in range(line.num_images)]
        try:
            request = line.request()
            if request.vae is None:
                request = replace(request, vae=self.vae)  # applied inside generate, as `txt2img --vae`
            seeds = request.image_seeds()
            loads = self.loads
            load_started = time.perf_counter()
            engine = self.engine_for(line.model)
            load_seconds = time.perf_counter() - load_started if self.loads != loads else 0.0
            result = engine.generate(request, progress_bar=False)
            images = [
                ImageOutcome(k=k, seed=seed, png=encode_png(image, info))
                for k, (image, seed, info) in enumerate(zip(result.images, result.seeds, result.infotexts, strict=True))
            ]
        except Exception as exc:  # noqa: BLE001 - one line's failure is recorded; the rest go on
            message = describe_error(exc)
            logger.warning("job %s failed: %s", line.id, message)
            self._free_device_memory()
            return LineResult(
                id=line.id, images=[ImageOutcome(k=k, seed=s, png=None, error=message) for k, s in enumerate(seeds)],
                model=self.model, model_hash=self._model_hash(), error=message, worker=self.name,
                timings={"total": time.perf_counter() - started},
            )
        timings = dict(result.timings)
        timings["line"] = time.perf_counter() - started
        if load_seconds:
            timings["load"] = load_seconds
        vae = engine.vae_infotext() if hasattr(engine, "vae_infotext") else {}
        return LineResult(id=line.id, images=images, model=getattr(engine.bundle, "name", line.model),
                          model_hash=self._model_hash(), timings=timings, worker=self.name,
                          vae=vae.get("VAE"), vae_hash=vae.get("VAE hash"))

    def _model_hash(self) -> str | None:
        return None if self.engine is None else getattr(self.engine.bundle, "hash", None)

    def _free_device_memory(self) -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - freeing memory is best effort
            pass
