"""The job queue: one worker thread owns the engine (and so the GPU); requests wait in FIFO order.

Every job has an id, a state (queued -> running -> done | failed | cancelled), live progress with an
ETA from the measured step time, and a `concurrent.futures.Future` that front ends wait on
(`asyncio.wrap_future` in the HTTP server). An exception inside one job (CUDA out of memory, NaN, a
bad image) fails that job only; the worker frees the device cache and takes the next job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import enum
import gc
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from leansd.errors import InvalidRequestError, LeansdError

if TYPE_CHECKING:
    from PIL import Image

    from leansd.request import GenerationRequest, GenerationResult, ProgressEvent

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 32


class QueueFullError(LeansdError):
    """The queue holds `max_queue` waiting jobs; try again after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueClosedError(LeansdError):
    """The queue is shutting down and takes no new jobs."""


class JobTooLongError(InvalidRequestError):
    """The job's estimated time on this device exceeds the server's `max_job_seconds`."""


class JobCancelledError(LeansdError):
    """The job was cancelled (by `cancel(job_id)` or by shutdown) before it finished."""


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobKind(str, enum.Enum):
    GENERATE = "generate"
    SWITCH_MODEL = "switch_model"
    """Load another checkpoint (`Engine.switch_model`): queued like a generation, so it never races
    one; it can be cancelled while it waits, not once the load has started."""


class GeneratingEngine(Protocol):
    """What the worker needs from an engine: `leansd.Engine` or a test double wrapping one."""

    def generate(
        self,
        request: "GenerationRequest",
        *,
        progress: "Callable[[ProgressEvent], None] | None" = None,
        progress_bar: bool = True,
    ) -> "GenerationResult": ...

    def set_budget(self, vram: "str | int | None") -> int | None: ...


@dataclass(frozen=True)
class JobProgress:
    """A snapshot of a job's progress; `fraction` and `eta_seconds` cover all of its batches."""

    step: int = 0
    total_steps: int = 0
    batch_index: int = 0
    n_batches: int = 1
    fraction: float = 0.0
    eta_seconds: float | None = None
    """Seconds left, from the measured time per step (None until the first step is done)."""


class Job:
    """One request in the queue. Read its fields; change it only through the `JobQueue`."""

    def __init__(self, request: "GenerationRequest | None", *, checkpoint: str | None = None) -> None:
        self.id: str = uuid.uuid4().hex
        self.request = request
        """The generation request (None for a model switch)."""
        self.checkpoint = checkpoint
        """For a model switch: the checkpoint to load (a library name, A1111 title or path)."""
        self.kind = JobKind.GENERATE if checkpoint is None else JobKind.SWITCH_MODEL
        self.state: JobState = JobState.QUEUED
        self.created: float = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.result: "GenerationResult | None" = None
        self.error: BaseException | None = None
        self.future: concurrent.futures.Future["GenerationResult"] = concurrent.futures.Future()
        self.progress = JobProgress(n_batches=getattr(request, "n_iter", 1))
        self.interrupted = False
        """True when `interrupt()` stopped the job early: the result holds the images finished so far."""
        self._cancel = False
        self._stop = False
        self._skip = False
        self._first_step: tuple[float, int] | None = None
        self.preview: "Image.Image | None" = None
        """The latest live preview while the job runs (the request's `preview_every`); None once it ends."""
        self.preview_id = 0
        """Counts the previews so far: front ends poll it to see whether `preview` changed."""

    def __repr__(self) -> str:
        return f"Job({self.id[:8]}, {self.state.value})"

    @property
    def stop_requested(self) -> bool:
        """An interrupt or a cancel is pending or done."""
        return self._stop or self._cancel

    @property
    def skip_requested(self) -> bool:
        return self._skip

    def wait(self, timeout: float | None = None) -> "GenerationResult":
        """Block until the job ends; its result, or the exception that failed or cancelled it."""
        return self.future.result(timeout)

    def snapshot(self) -> dict[str, Any]:
        p = self.progress
        return {
            "id": self.id,
            "kind": self.kind.value,
            "state": self.state.value,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "step": p.step,
            "total_steps": p.total_steps,
            "batch_index": p.batch_index,
            "n_batches": p.n_batches,
            "progress": p.fraction,
            "eta_seconds": p.eta_seconds,
            "error": None if self.error is None else str(self.error) or type(self.error).__name__,
        }

    def _check(self) -> None:
        """Called within a step (before each UNet/VAE layer): honour cancel, interrupt and skip at once."""
        if self._cancel or self._stop:
            from leansd.request import StopGeneration

            raise StopGeneration()
        if self._skip:
            from leansd.request import SkipBatch

            self._skip = False
            raise SkipBatch()

    def _on_progress(self, event: "ProgressEvent") -> None:
        """Progress callback of the running job (worker thread): record, then honour cancel/skip."""
        from leansd.request import SkipBatch, StopGeneration

        now = time.perf_counter()
        per_batch = max(event.total_steps, 1)
        done = event.batch_index * per_batch + event.step
        total = max(event.n_batches * per_batch, done, 1)
        # ETA from the measured time per step since the first reported step (which includes the
        # prompt encoding and set-up, so it is only the reference point).
        if self._first_step is None:
            self._first_step = (now, done)
        t0, done0 = self._first_step
        eta = (now - t0) / (done - done0) * (total - done) if done > done0 else None
        self.progress = JobProgress(
            step=event.step,
            total_steps=event.total_steps,
            batch_index=event.batch_index,
            n_batches=event.n_batches,
            fraction=min(done / total, 1.0),
            eta_seconds=eta,
        )
        if event.preview is not None:
            self.preview = event.preview
            self.preview_id += 1
        if self._cancel or self._stop:
            raise StopGeneration()
        if self._skip:
            self._skip = False
            raise SkipBatch()


class JobQueue:
    """FIFO of generation jobs run one at a time by a worker thread that owns `engine`.

    `max_queue` bounds the jobs *waiting* (the running one is not counted); `submit` beyond it
    raises `QueueFullError` at once, never blocks. Create, `start()`, `submit()`, and finally
    `shutdown()`. `on_progress(job)` (optional) is called from the worker after every step.

    With an engine that offers `interruptible` (`leansd.Engine` does), cancel, interrupt, skip and
    shutdown take effect within a step, before the next UNet or VAE layer. `max_job_seconds`
    (engines with `estimate` and `calibrate_speed`): the worker first measures the device's speed,
    then a job whose estimated time exceeds the limit is refused with `JobTooLongError`, at `submit`
    once the speed is known, else when the worker takes it. None: no limit.
    """

    def __init__(
        self,
        engine: GeneratingEngine,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        history: int = 256,
        max_job_seconds: float | None = None,
    ) -> None:
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        if max_job_seconds is not None and (isinstance(max_job_seconds, bool) or not max_job_seconds > 0):
            raise ValueError(f"max_job_seconds must be a positive number of seconds or None, got {max_job_seconds!r}")
        self.engine = engine
        self.max_queue = max_queue
        self.max_job_seconds = max_job_seconds if hasattr(engine, "estimate") else None
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._history = history
        self._current: Job | None = None
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=16)
        self._calibration = threading.Lock()
        self._calibrated = False
        self.completed = 0
        """Jobs that reached a final state (done, failed or cancelled)."""

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "JobQueue":
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="leansd-worker", daemon=True)
                self._thread.start()
        return self

    def __enter__(self) -> "JobQueue":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, reason: str = "the server is shutting down") -> int:
        """Stop taking jobs and cancel every waiting one (their futures raise JobCancelledError).

        The running job goes on. Returns how many waiting jobs were cancelled. Never blocks.
        """
        with self._lock:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in waiting:  # under the lock, so a concurrent cancel() sees them finished
                job.state = JobState.CANCELLED
            self._lock.notify_all()
        for job in waiting:
            self._finish_cancelled(job, f"job {job.id} cancelled before it started: {reason}")
        return len(waiting)

    def shutdown(self, timeout: float | None = 30.0, *, reason: str = "the server is shutting down") -> bool:
        """Close, let the running job finish for up to `timeout` seconds, then cancel it.

        Returns True when the worker thread has stopped.
        """
        self.close(reason=reason)
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            with self._lock:
                running = self._current
                if running is not None:
                    running._cancel = True
            logger.warning("shutdown: cancelling the running job after %.0f s", timeout or 0)
            thread.join(10.0)
        return not thread.is_alive()

    # ---- submitting and inspecting -----------------------------------------------------------

    def submit(self, request: "GenerationRequest") -> Job:
        """Queue a (validated) request; QueueFullError if `max_queue` jobs already wait, JobTooLongError
        if it would run longer than `max_job_seconds` (when the device's speed is known)."""
        self._check_time(request)
        return self._enqueue(Job(request))

    def _enqueue(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise QueueClosedError("the server is shutting down and takes no new jobs")
            if len(self._waiting) >= self.max_queue:
                retry = self._retry_after_locked()
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} jobs waiting); retry in about {retry} s",
                    retry_after=retry,
                )
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._trim_history_locked()
            self._lock.notify_all()
        return job

    def submit_switch(self, checkpoint: str) -> Job:
        """Queue a model switch to `checkpoint` (see `JobKind.SWITCH_MODEL`); its result is True when
        another model was loaded, False when `checkpoint` was loaded already. QueueFullError as `submit`."""
        if not callable(getattr(self.engine, "switch_model", None)):
            raise InvalidRequestError("this server cannot switch checkpoints")
        return self._enqueue(Job(None, checkpoint=checkpoint))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    @property
    def current(self) -> Job | None:
        return self._current

    def waiting(self) -> list[Job]:
        with self._lock:
            return list(self._waiting)

    def status(self) -> dict[str, Any]:
        with self._lock:
            current = self._current
            return {
                "running": None if current is None else current.snapshot(),
                "waiting": [job.id for job in self._waiting],
                "max_queue": self.max_queue,
                "completed": self.completed,
                "closed": self._closed,
            }

    # ---- control --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> bool:
        """Cancel a waiting job (it never runs) or the running one (it stops at the next step).

        Either way its future raises JobCancelledError. False if the id is unknown or finished.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state.finished:
                return False
            if job.state is JobState.QUEUED:
                if job not in self._waiting:  # the worker or close() took it meanwhile
                    return False
                self._waiting.remove(job)
                job.state = JobState.CANCELLED
            elif job.kind is JobKind.SWITCH_MODEL:
                return False  # a load that has started finishes (or fails) as a whole
            else:
                job._cancel = True
                return True
        self._finish_cancelled(job, f"job {job.id} was cancelled before it started")
        return True

    def interrupt(self) -> bool:
        """A1111's interrupt: stop the running job; it ends *done* with the images finished so far."""
        with self._lock:
            job = self._current
            if job is None:
                return False
            job._stop = True
            return True

    def skip(self) -> bool:
        """A1111's skip: drop the running job's current batch and go on with its next one."""
        with self._lock:
            job = self._current
            if job is None:
                return False
            job._skip = True
            return True

    # ---- the worker -----------------------------------------------------------------------

    def _check_time(self, request: "GenerationRequest") -> None:
        """JobTooLongError if the request's estimated time exceeds `max_job_seconds`."""
        estimate_of = getattr(self.engine, "estimate", None)
        if self.max_job_seconds is None or estimate_of is None:
            return
        try:
            estimate = estimate_of(request)
        except InvalidRequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - an estimator problem must not stop the service
            logger.warning("cannot estimate the job's time (%s: %s); running it", type(exc).__name__, exc)
            return
        if estimate.seconds is not None and estimate.seconds > self.max_job_seconds:
            raise JobTooLongError(
                f"this job would take {estimate.describe()} on {getattr(self.engine, 'device', 'this device')}, "
                f"more than this server's limit of {self.max_job_seconds:g} s (--max-job-seconds); "
                "ask for a smaller size, fewer steps or fewer images"
            )

    def _calibrate(self) -> None:
        """Measure the device's speed once, before the first job, so estimates exist from the start.

        With several worker threads, the first measures and the others wait for it."""
        if self.max_job_seconds is None or not hasattr(self.engine, "calibrate_speed"):
            return
        with self._calibration:
            if self._calibrated:
                return
            self._calibrated = True
            try:
                self.engine.calibrate_speed()
            except Exception as exc:  # noqa: BLE001 - without a speed, jobs run unestimated
                logger.warning("could not measure the device's speed (%s: %s)", type(exc).__name__, exc)
                self._free_memory()

    def _run(self) -> None:
        """A worker thread's loop: take the oldest waiting job, run it, until closed and drained."""
        self._calibrate()
        while (job := self._next_job()) is not None:
            try:
                self._execute(job)
            finally:
                with self._lock:
                    self._job_ended_locked(job)
                    self.completed += 1
                    if job.started is not None:
                        self._durations.append(time.time() - job.started)

    def _next_job(self) -> Job | None:
        """Wait for a job and mark it running; None once the queue is closed and drained."""
        with self._lock:
            while not self._waiting and not self._closed:
                self._lock.wait()
            if not self._waiting:
                return None
            job = self._waiting.popleft()
            job.state = JobState.RUNNING
            job.started = time.time()
            self._job_started_locked(job)
            return job

    def _job_started_locked(self, job: Job) -> None:
        """Bookkeeping when a worker takes `job` (under the lock): it is the current job."""
        self._current = job

    def _job_ended_locked(self, job: Job) -> None:
        """Bookkeeping when `job` ends (under the lock)."""
        self._current = None

    def _execute(self, job: Job) -> None:
        interruptible = getattr(self.engine, "interruptible", None)
        try:
            if job.kind is JobKind.SWITCH_MODEL:
                result: Any = self.engine.switch_model(job.checkpoint)  # type: ignore[attr-defined]
            else:
                request = job.request
                assert request is not None  # a generation job always has one
                self._check_time(request)
                within_steps = interruptible(job._check) if callable(interruptible) else contextlib.nullcontext()
                with within_steps:
                    result = self.engine.generate(request, progress=job._on_progress, progress_bar=False)
        except BaseException as exc:  # noqa: BLE001 - one job's failure must never stop the worker
            job.preview = None  # a preview never outlives its job
            if job._cancel:
                job.finished = time.time()
                job.error = JobCancelledError(f"job {job.id} was cancelled while running")
                job.state = JobState.CANCELLED
                job.future.set_exception(job.error)
                self._free_memory()
                return
            job.error = exc
            job.state = JobState.FAILED
            job.finished = time.time()
            job.future.set_exception(exc)
            logger.warning("job %s failed: %s: %s", job.id, type(exc).__name__, exc)
            self._free_memory()
            return
        job.finished = time.time()
        job.preview = None  # a preview never outlives its job
        if job._cancel:
            job.error = JobCancelledError(f"job {job.id} was cancelled while running")
            job.state = JobState.CANCELLED
            job.future.set_exception(job.error)
            return
        job.interrupted = job._stop
        job.result = result
        job.state = JobState.DONE
        job.future.set_result(result)

    def _free_memory(self) -> None:
        """After a failure: drop the failed job's tensors and, on CUDA, the cached blocks."""
        gc.collect()
        device = getattr(self.engine, "device", None)
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()

    # ---- helpers ----------------------------------------------------------------------------

    def _finish_cancelled(self, job: Job, message: str) -> None:
        job.state = JobState.CANCELLED
        job.finished = time.time()
        job.error = JobCancelledError(message)
        job.future.set_exception(job.error)
        with self._lock:
            self.completed += 1

    def _retry_after_locked(self) -> int:
        """Seconds until a slot is likely free: the mean recent job time (at least 1 s)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, min(3600, math.ceil(mean)))

    def _trim_history_locked(self) -> None:
        while len(self._jobs) > self._history + len(self._waiting) + 1:
            oldest_id, oldest = next(iter(self._jobs.items()))
            if not oldest.state.finished:
                break
            del self._jobs[oldest_id]
