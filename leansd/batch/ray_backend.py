"""Batch lines on a Ray cluster: one worker actor per GPU (or per node on CPUs), each with one Engine.

Ray schedules the actors and moves the data; leansd adds only the bookkeeping a batch needs. Lines
go to actors from per-model queues (an actor keeps taking lines of the model it holds), at most
`depth` lines in flight per actor so the next line is already there when one finishes. Results
(PNG bytes) stream back to the driver, which alone writes files and the manifest.

Faults: when an actor dies, the line it was running is retried on another actor (a new actor
replaces the dead one); a line whose worker died `max_attempts` times is recorded as failed, so a
line that crashes every worker is not retried forever. Lines queued behind it go back to the queue
without counting an attempt. `close()` kills the actors (Ctrl+C ends the run at once).
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Callable, Iterator

from leansd.batch.jobs import JobLine
from leansd.batch.worker import BatchWorker, ImageOutcome, LineResult, describe_error
from leansd.errors import InvalidRequestError

logger = logging.getLogger(__name__)

INSTALL_HINT = "--ray needs Ray, which is not installed: pip install 'leansd[ray]' (or pip install 'ray[default]')"
SERVE_INSTALL_HINT = ("--ray needs Ray Serve, which is not installed: pip install 'leansd[ray]' "
                      "(or pip install 'ray[serve]')")
DEFAULT_DEPTH = 2
DEFAULT_MAX_ATTEMPTS = 2


def join_cluster(address: str | None) -> tuple[bool, int, int]:
    """Join the Ray cluster at `address` ("" or None: the running one, else a new one on this machine)
    unless this process is already in one: (whether this call started it, its GPUs, its CPUs >= 1)."""
    import ray

    owns = False
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise InvalidRequestError(f"cannot connect to the Ray cluster at {address or 'auto'}: {exc}") from None
        owns = True
    resources = ray.cluster_resources()
    return owns, int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))


def require_ray(*, serve: bool = False) -> Any:
    """The `ray` module (`ray.serve` with `serve`); InvalidRequestError saying how to install it when missing."""
    try:
        import ray

        if serve:
            from ray import serve as ray_serve

            return ray_serve
    except ImportError:
        raise InvalidRequestError(SERVE_INSTALL_HINT if serve else INSTALL_HINT) from None
    return ray


class BatchActor:
    """The body of a Ray worker actor: a BatchWorker plus what the driver wants to know about it."""

    def __init__(self, engine_options: dict[str, Any], threads: int | None, name: str,
                 load: "Callable[..., Any] | None" = None, vae: str = "Automatic") -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker = BatchWorker(engine_options=engine_options, load=load, name=name, vae=vae)

    def info(self) -> dict[str, Any]:
        import ray

        return {"name": self.worker.name, "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "node": ray.get_runtime_context().get_node_id()}

    def run(self, line: JobLine) -> LineResult:
        return self.worker.run(line)

    def loads(self) -> int:
        return self.worker.loads


class RayBackend:
    """Runs job lines on `workers` Ray actors; see the module notes for scheduling and faults.

    `gpus_per_worker` 1 gives each actor its own GPU (Ray sets CUDA_VISIBLE_DEVICES); 0 makes CPU
    actors with `cpus_per_worker` cores and as many torch threads. `load` replaces `Engine.load`
    inside the actors (it must be importable there). `vae`: as `BatchWorker`'s (a file path must
    be readable on every node, as the model's is).
    """

    def __init__(
        self,
        *,
        workers: int,
        engine_options: dict[str, Any],
        gpus_per_worker: float = 0,
        cpus_per_worker: float = 1,
        depth: int = DEFAULT_DEPTH,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        load: "Callable[..., Any] | None" = None,
        owns_ray: bool = False,
        vae: str = "Automatic",
    ) -> None:
        ray = require_ray()
        if workers < 1:
            raise InvalidRequestError(f"--workers must be at least 1, got {workers}")
        self.ray = ray
        self.workers = workers
        self.engine_options = dict(engine_options)
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.depth = max(1, depth)
        self.max_attempts = max(1, max_attempts)
        self.load = load
        self.owns_ray = owns_ray
        self.vae = vae
        self.actors: list[Any] = []
        self.started = 0
        self.deaths = 0
        self._remote = ray.remote(BatchActor)

    @classmethod
    def connect(cls, address: str | None, *, workers: int | None, engine_options: dict[str, Any],
                **options: Any) -> "RayBackend":
        """Join the cluster at `address` ("" or None: the running one, else a new one on this machine)."""
        ray = require_ray()
        owns, gpus, cpus = join_cluster(address)
        if gpus:
            count = workers or gpus
            if count > gpus:
                raise InvalidRequestError(
                    f"--workers {count} needs {count} GPUs (one per worker) but the cluster has {gpus}"
                )
            # More GPUs than CPUs: fractions of a CPU, so every GPU still gets its actor.
            gpus_per_worker, cpus_per_worker = 1, (cpus // count if count <= cpus else cpus / count)
        else:
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            count = workers or max(1, nodes)
            if count > cpus:
                raise InvalidRequestError(f"--workers {count} needs a CPU each but the cluster has {cpus}")
            gpus_per_worker, cpus_per_worker = 0, max(1, cpus // count)
        logger.info("Ray cluster: %d CPUs, %d GPUs; %d workers", cpus, gpus, count)
        return cls(workers=count, engine_options=engine_options, owns_ray=owns, gpus_per_worker=gpus_per_worker,
                   cpus_per_worker=cpus_per_worker, **options)

    # ---- actors ---------------------------------------------------------------------------

    def _start_actor(self) -> Any:
        self.started += 1
        threads = max(1, int(self.cpus_per_worker))
        actor = self._remote.options(num_gpus=self.gpus_per_worker, num_cpus=self.cpus_per_worker,
                                     max_restarts=0, max_task_retries=0).remote(
            self.engine_options, threads, f"ray-{self.started}", self.load, self.vae)
        self.actors.append(actor)
        return actor

    def start(self) -> list[dict[str, Any]]:
        """Start the missing actors and wait until each is up; their info (pid, GPU ids)."""
        while len(self.actors) < self.workers:
            self._start_actor()
        return self.ray.get([actor.info.remote() for actor in self.actors])

    # ---- running --------------------------------------------------------------------------

    def run(self, lines: list[JobLine]) -> Iterator[LineResult]:
        ray = self.ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        queues: dict[str, collections.deque[JobLine]] = collections.OrderedDict()
        for line in lines:
            queues.setdefault(line.model, collections.deque()).append(line)
        attempts: collections.Counter[str] = collections.Counter()
        holds: dict[int, str] = {}  # actor id -> the model its lines use
        inflight: dict[Any, tuple[Any, JobLine]] = {}
        order: dict[int, collections.deque[Any]] = collections.defaultdict(collections.deque)  # per actor, refs
        if lines:
            self.start()

        def take(actor: Any) -> JobLine | None:
            model = holds.get(id(actor))
            queue = queues.get(model) if model is not None else None
            if not queue:
                queue = next((q for q in queues.values() if q), None)
            return queue.popleft() if queue else None

        def pending() -> bool:
            return any(queues.values())

        while pending() or inflight:
            for actor in list(self.actors):
                while len(order[id(actor)]) < self.depth and pending():
                    taken = take(actor)
                    if taken is None:
                        break
                    line = taken
                    holds[id(actor)] = line.model
                    try:
                        # Images are read here, on the driver: workers need not see the job file's folder.
                        payload = line.with_request() if line.task == "img2img" else line
                    except Exception as exc:  # noqa: BLE001 - e.g. an image deleted since validation
                        yield _failed(line, describe_error(exc))
                        continue
                    ref = actor.run.remote(payload)
                    inflight[ref] = (actor, line)
                    order[id(actor)].append(ref)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            actor, line = inflight[ref]
            try:
                result = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as exc:
                # The actor is gone: the line it was running counts an attempt, the ones queued behind
                # it go back untouched, and a new actor takes its place.
                self.deaths += 1
                refs = order.pop(id(actor))
                holds.pop(id(actor), None)
                if actor in self.actors:
                    self.actors.remove(actor)
                for position, other in enumerate(refs):
                    _, queued = inflight.pop(other)
                    if position > 0:
                        queues.setdefault(queued.model, collections.deque()).appendleft(queued)
                        continue
                    attempts[queued.id] += 1
                    if attempts[queued.id] >= self.max_attempts:
                        yield _died(queued, attempts[queued.id], exc)
                    else:
                        logger.warning("a worker died running line %d (id %s); retrying it on another",
                                       queued.line, queued.id)
                        queues.setdefault(queued.model, collections.deque()).appendleft(queued)
                if pending():
                    self._start_actor()
                continue
            inflight.pop(ref)
            order[id(actor)].remove(ref)
            yield result

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - an actor already gone needs no killing
                pass
        self.actors = []
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self.owns_ray = False


def _died(line: JobLine, attempts: int, exc: BaseException) -> LineResult:
    from leansd.errors import one_line

    return _failed(line, f"the worker running this line died {attempts} times ({one_line(exc, limit=160)}); "
                   "not retried again")


def _failed(line: JobLine, message: str) -> LineResult:
    seeds = [line.seed + k for k in range(line.num_images)]
    return LineResult(id=line.id, images=[ImageOutcome(k=k, seed=s, png=None, error=message) for k, s in enumerate(seeds)],
                      model=None, model_hash=None, error=message, worker="ray")
