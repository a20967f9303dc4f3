"""`leansd serve --ray`: the same `/sdapi/v1` app and web UI in front of N Ray Serve replicas.

The HTTP app (routes, auth, Origin guard, web UI) runs in the `leansd serve` process as always; its
job queue is a `RayJobQueue`, which runs up to N jobs at once, one per replica. Each replica of the
`EngineReplica` deployment owns one Engine (one GPU each on a GPU cluster) and takes one request at
a time, so Ray Serve spreads concurrent requests over the replicas.

Progress and control go through a small `ProgressBoard` actor keyed by job: the replica running a
job posts every step there (with the live preview, when the request asks for one) and reads back a
stop/skip flag, the queue reads the progress for
`/progress` and the web UI and posts the flags that interrupt, skip or cancel sets. So an interrupt
reaches the replica that runs the job, whichever it is.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from leansd.errors import InvalidRequestError
from leansd.service.queue import DEFAULT_MAX_QUEUE, JobQueue

if TYPE_CHECKING:
    from leansd.engine.estimate import JobEstimate
    from leansd.models.library import ModelLibrary
    from leansd.request import GenerationRequest, GenerationResult, ProgressEvent

logger = logging.getLogger(__name__)

APP_NAME = "leansd"
POLL_SECONDS = 0.1
SPEED_KEY = "_leansd_flops_per_second"
REPLICAS_KEEP_MODEL = ("Ray Serve replicas keep the server's checkpoint, VAE and prediction type: restart with "
                       "--model/--vae/--prediction-type to change them")


class ProgressBoard:
    """Per job: the last progress event the replica posted, and the flag the front end set."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, str] = {}

    def step(self, key: str, event: dict[str, Any]) -> str | None:
        """A replica finished a step; returns "stop", "skip" (once) or None."""
        self.events[key] = event
        flag = self.flags.get(key)
        if flag == "skip":
            del self.flags[key]
        return flag

    def read(self, key: str) -> dict[str, Any] | None:
        return self.events.get(key)

    def flag(self, key: str, value: str) -> None:
        if value == "stop" or self.flags.get(key) != "stop":
            self.flags[key] = value

    def forget(self, key: str) -> None:
        self.events.pop(key, None)
        self.flags.pop(key, None)


class EngineReplica:
    """One Ray Serve replica: one Engine, one request at a time."""

    def __init__(self, model: str, engine_options: dict[str, Any], board: Any, threads: int | None = None,
                 load: "Callable[..., Any] | None" = None, vae: str | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        if load is None:
            from leansd.engine.engine import Engine

            load = Engine.load
        self.engine = load(model, **engine_options)
        if vae is not None:  # the server's --vae choice (A1111's sd_vae), as a local engine gets it
            self.engine.set_vae_choice(vae)
        self.board = board
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def describe(self) -> dict[str, Any]:
        bundle = self.engine.bundle
        store = self.engine.embeddings
        return {"name": bundle.name, "hash": bundle.hash, "source": str(bundle.source), "replica": self.name,
                "default_size": bundle.default_size, "vae_scale_factor": bundle.vae_scale_factor,
                "device": str(self.engine.device), "precision": self.engine.precision.name,
                "budget": self.engine.budget, "memory_policy": self.engine.memory_policy,
                # What the front end needs to estimate a job's time and to list the embeddings.
                "unet": (type(bundle.unet), dict(bundle.unet.config)), "vae": (type(bundle.vae), dict(bundle.vae.config)),
                "scheduler_config": dict(bundle.scheduler_config),
                "embeddings": {"width": store.width, "encoder": store.encoder, "also": store.also}}

    def calibrate_speed(self) -> float:
        """This replica's measured UNet speed in FLOP/s (`Engine.calibrate_speed`)."""
        return self.engine.calibrate_speed()

    def generate(self, key: str, request: "GenerationRequest") -> "GenerationResult":
        import ray

        from leansd.request import SkipBatch, StopGeneration

        def on_step(event: "ProgressEvent") -> None:
            # Waits for the board's answer: the flag decides whether this job goes on.
            flag = ray.get(self.board.step.remote(key, {
                "step": event.step, "total_steps": event.total_steps,
                "batch_index": event.batch_index, "n_batches": event.n_batches, "preview": event.preview}))
            if flag == "stop":
                raise StopGeneration()
            if flag == "skip":
                raise SkipBatch()

        result = self.engine.generate(request, progress=on_step, progress_bar=False)
        result.info["replica"] = self.name
        result.info[SPEED_KEY] = self.engine.speed.flops_per_second  # taken off by RemoteEngine
        return result


@dataclass
class _Bundle:
    """What the front ends read of a model (`engine.bundle`), as the replicas report it."""

    name: str
    hash: str | None
    source: str
    default_size: int
    vae_scale_factor: int


class RemoteEngine:
    """The engine the queue's workers call: forwards each job to a replica, relays its progress."""

    def __init__(self, handle: Any, board: Any, info: dict[str, Any], replicas: int, *,
                 library: "ModelLibrary | None" = None) -> None:
        from leansd.models.embeddings import EmbeddingStore
        from leansd.models.library import ModelLibrary

        self.handle = handle
        self.board = board
        self.library = library if library is not None else ModelLibrary()
        """The replicas' model library (the same folders): what the library routes and the web UI list."""
        self.embeddings = EmbeddingStore(self.library, **info["embeddings"])
        self._info = info
        self._estimator: _Estimator | None = None
        self.flops_per_second: float | None = None
        """The replicas' measured speed (the latest any of them reported)."""
        self.bundle = _Bundle(name=info["name"], hash=info.get("hash"), source=info.get("source", info["name"]),
                              default_size=info["default_size"], vae_scale_factor=info["vae_scale_factor"])
        self.device = f"{info.get('device')} x {replicas} Ray Serve replicas"
        self.precision = type("Precision", (), {"name": info.get("precision")})()
        self.budget = info.get("budget")
        self.memory_policy = info.get("memory_policy")
        self.plan = None
        self.replicas = replicas
        self.ran_on: collections.Counter[str] = collections.Counter()
        """How many jobs each replica ran (by its host:pid)."""
        self._lock = threading.Lock()

    def set_budget(self, vram: Any) -> None:
        raise InvalidRequestError("the VRAM budget of Ray replicas is set when the server starts (--vram)")

    def switch_model(self, spec: str) -> bool:
        raise InvalidRequestError(REPLICAS_KEEP_MODEL)

    def calibrate_speed(self) -> float:
        """Measure the speed on a replica (the queue does this once, before the first job)."""
        self.flops_per_second = float(self.handle.calibrate_speed.remote().result())
        return self.flops_per_second

    def estimate(self, request: "GenerationRequest") -> "JobEstimate":
        """The request's FLOPs (counted here, on a weightless copy of the replicas' model) and its time
        at the replicas' measured speed: the same estimate a single-process server makes."""
        from leansd.engine.estimate import estimate

        if self._estimator is None:
            self._estimator = _Estimator(self._info)
        self._estimator.speed.flops_per_second = self.flops_per_second
        return estimate(self._estimator, request)  # type: ignore[arg-type]

    def generate(self, request: "GenerationRequest", *, progress: "Callable[[ProgressEvent], None] | None" = None,
                 progress_bar: bool = False) -> "GenerationResult":
        import ray

        from leansd.request import ProgressEvent, SkipBatch, StopGeneration

        if request.checkpoint is not None or request.vae is not None or request.prediction_type is not None:
            raise InvalidRequestError(REPLICAS_KEEP_MODEL)  # one replica would differ from the rest
        key = uuid.uuid4().hex
        response = self.handle.generate.remote(key, request)
        last = None
        try:
            while True:
                try:
                    result = response.result(timeout_s=POLL_SECONDS)
                    break
                except TimeoutError:
                    pass
                if progress is None:
                    continue
                event = ray.get(self.board.read.remote(key))
                position = None if event is None else (event["batch_index"], event["step"])
                if position is None or position == last:
                    continue
                last = position
                try:
                    progress(ProgressEvent(**event))
                except StopGeneration:
                    self.board.flag.remote(key, "stop")
                except SkipBatch:
                    self.board.flag.remote(key, "skip")
        finally:
            self.board.forget.remote(key)
        rate = result.info.pop(SPEED_KEY, None)
        with self._lock:
            self.ran_on[result.info.get("replica", "?")] += 1
            if rate:
                self.flops_per_second = rate
        return result


class _Estimator:
    """What `leansd.engine.estimate.estimate` reads of an Engine, built from a replica's description:
    the UNet and VAE on the "meta" device (no weights), the scheduler config and the measured speed."""

    def __init__(self, info: dict[str, Any]) -> None:
        import types

        import torch

        from leansd.engine.estimate import FlopCounter

        (unet_class, unet_config), (vae_class, vae_config) = info["unet"], info["vae"]
        with torch.device("meta"):
            unet, vae = unet_class.from_config(unet_config), vae_class.from_config(vae_config)
        self.bundle = types.SimpleNamespace(unet=unet, vae=vae, scheduler_config=info["scheduler_config"],
                                            default_size=info["default_size"], vae_scale_factor=info["vae_scale_factor"])
        self.device = torch.device("cpu")
        self.flop_counter = FlopCounter(unet, vae)
        self.speed = types.SimpleNamespace(flops_per_second=None)


class RayJobQueue(JobQueue):
    """A JobQueue whose `workers` threads each run one job at a time on the Ray Serve replicas.

    `current` is the oldest running job (what A1111's /progress, /interrupt and /skip act on);
    `cancel(job_id)` reaches any running job.
    """

    def __init__(self, engine: RemoteEngine, *, workers: int, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_job_seconds: float | None = None, on_shutdown: "Callable[[], None] | None" = None) -> None:
        super().__init__(engine, max_queue=max_queue, max_job_seconds=max_job_seconds)
        self.workers = workers
        self._running: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._on_shutdown = on_shutdown

    def start(self) -> "RayJobQueue":
        with self._lock:
            if not self._threads:
                for i in range(self.workers):
                    thread = threading.Thread(target=self._run, name=f"leansd-ray-{i}", daemon=True)
                    self._threads.append(thread)
                    thread.start()
                self._thread = self._threads[0]
        return self

    def running(self) -> list[Any]:
        with self._lock:
            return list(self._running)

    def _job_started_locked(self, job: Any) -> None:
        self._running.append(job)
        self._current = self._running[0]

    def _job_ended_locked(self, job: Any) -> None:
        self._running.remove(job)
        self._current = self._running[0] if self._running else None

    def status(self) -> dict[str, Any]:
        status = super().status()
        status["running_jobs"] = [job.snapshot() for job in self.running()]
        status["replicas"] = self.workers
        return status

    def shutdown(self, timeout: float | None = 30.0, *, reason: str = "the server is shutting down") -> bool:
        self.close(reason=reason)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            with self._lock:
                for job in self._running:
                    job._cancel = True
            logger.warning("shutdown: cancelling the running jobs after %.0f s", timeout or 0)
            for thread in self._threads:
                thread.join(10.0)
        stopped = not any(t.is_alive() for t in self._threads)
        if self._on_shutdown is not None:
            callback, self._on_shutdown = self._on_shutdown, None
            callback()
        return stopped


def start_ray_queue(
    address: str | None,
    *,
    model: str,
    replicas: int,
    engine_options: dict[str, Any],
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_job_seconds: float | None = None,
    load: "Callable[..., Any] | None" = None,
    vae: str | None = None,
) -> RayJobQueue:
    """Join the Ray cluster at `address`, deploy `replicas` EngineReplicas of `model`, return the queue.

    On a cluster with GPUs each replica gets one (Ray sets CUDA_VISIBLE_DEVICES), else the CPUs are
    shared out. The queue's shutdown deletes the Serve application (and leaves the cluster running).
    `max_job_seconds`: as the single-process server's (`JobQueue`): the replicas' speed is measured
    before the first job and longer jobs are refused. The front end lists the library in
    `engine_options["library"]`, the one the replicas load LoRAs, embeddings and VAEs from.
    """
    from leansd.batch.ray_backend import join_cluster, require_ray

    serve = require_ray(serve=True)
    import ray

    if replicas < 1:
        raise InvalidRequestError(f"--replicas must be at least 1, got {replicas}")
    owns, gpus, cpus = join_cluster(address)
    if gpus and replicas > gpus:
        raise InvalidRequestError(f"--replicas {replicas} needs {replicas} GPUs (one per replica) but the cluster has {gpus}")
    if not gpus and replicas > cpus:
        raise InvalidRequestError(f"--replicas {replicas} needs a CPU each but the cluster has {cpus}")
    per_cpu = cpus // replicas if replicas <= cpus else cpus / replicas
    actor_options = {"num_cpus": per_cpu, "num_gpus": 1 if gpus else 0}
    board: Any = ray.remote(ProgressBoard).options(num_cpus=0).remote()
    deployment = serve.deployment(EngineReplica, name="EngineReplica").options(
        num_replicas=replicas, max_ongoing_requests=1, ray_actor_options=actor_options)
    serve.start(proxy_location="Disabled")
    handle = serve.run(deployment.bind(model, engine_options, board, max(1, int(per_cpu)), load, vae), name=APP_NAME,
                       route_prefix=None)
    info = handle.describe.remote().result()
    logger.info("Ray Serve: %d replicas of %s (%s)", replicas, info["name"], actor_options)

    def stop() -> None:
        # Ctrl+C in a terminal reaches Ray's own processes too: whatever is already gone needs no stopping.
        try:
            serve.delete(APP_NAME)
            ray.kill(board)
        except Exception as exc:  # noqa: BLE001 - shutting down; the cluster may be gone already
            logger.info("Ray Serve cleanup: %s", exc)
        finally:
            if owns:
                ray.shutdown()

    engine = RemoteEngine(handle, board, info, replicas, library=engine_options.get("library"))
    return RayJobQueue(engine, workers=replicas, max_queue=max_queue, max_job_seconds=max_job_seconds,
                       on_shutdown=stop)
