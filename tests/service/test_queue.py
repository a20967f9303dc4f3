"""JobQueue: FIFO order, ids, progress, cancel, interrupt/skip, the bound, failure isolation, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from leansd.request import GenerationRequest, GenerationResult, ProgressEvent, SkipBatch, StopGeneration
from leansd.service import JobCancelledError, JobQueue, JobState, QueueClosedError, QueueFullError

from .conftest import OOMEngine, SlowEngine


class FakeEngine:
    """No model: `steps` progress events per batch, each waiting for `gate` (if set); records job order."""

    def __init__(self, *, step_time: float = 0.0) -> None:
        self.order: list[str] = []
        self.gate: threading.Event | None = None
        self.step_time = step_time
        self.started = threading.Event()

    def generate(self, request, *, progress=None, progress_bar=True):
        self.order.append(request.prompt)
        self.started.set()
        if request.prompt == "boom":
            raise RuntimeError("NaN in the latents (simulated)")
        seeds: list[int] = []
        for b in range(request.n_iter):
            try:
                for step in range(1, request.num_inference_steps + 1):
                    if self.gate is not None:
                        assert self.gate.wait(10)
                    time.sleep(self.step_time)
                    if progress is not None:
                        progress(ProgressEvent(step, request.num_inference_steps, b, request.n_iter))
            except SkipBatch:
                continue
            except StopGeneration:
                break
            seeds.append(request.seed + b)
        return GenerationResult(images=[], seeds=seeds, infotexts=[], request=request)


def req(prompt: str, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, num_inference_steps=kw.pop("steps", 2), seed=kw.pop("seed", 1), **kw)


def test_fifo_order_and_unique_ids() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    with JobQueue(engine, max_queue=16) as queue:
        jobs = [queue.submit(req(f"p{i}")) for i in range(8)]
        engine.gate.set()
        for job in jobs:
            job.wait(10)
    assert engine.order == [f"p{i}" for i in range(8)]
    assert len({job.id for job in jobs}) == 8
    assert all(job.state is JobState.DONE for job in jobs)
    assert all(queue.get(job.id) is job for job in jobs)


def test_progress_and_eta() -> None:
    engine = FakeEngine(step_time=0.01)
    seen = []
    with JobQueue(engine) as queue:
        job = queue.submit(req("p", steps=5, n_iter=2))
        while not job.state.finished:
            seen.append(job.progress)
            time.sleep(0.005)
        job.wait(10)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and 0 < max(fractions) <= 1
    assert job.progress.fraction == 1.0 and job.progress.eta_seconds == 0.0
    assert any(p.eta_seconds and p.eta_seconds > 0 for p in seen)
    assert job.progress.n_batches == 2 and job.progress.total_steps == 5


def test_bound_raises_queue_full_with_retry_after() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    with JobQueue(engine, max_queue=2) as queue:
        running = queue.submit(req("running"))
        assert engine.started.wait(5)  # the first job left the waiting line
        waiting = [queue.submit(req("a")), queue.submit(req("b"))]
        with pytest.raises(QueueFullError) as info:
            queue.submit(req("c"))
        assert info.value.retry_after >= 1 and "queue is full" in str(info.value)
        engine.gate.set()
        for job in (running, *waiting):
            job.wait(10)
    assert engine.order == ["running", "a", "b"]


def test_cancel_queued_and_running() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    with JobQueue(engine) as queue:
        running = queue.submit(req("running", steps=50))
        queued = queue.submit(req("queued"))
        after = queue.submit(req("after"))
        assert engine.started.wait(5)
        assert queue.cancel(queued.id)
        assert queued.state is JobState.CANCELLED
        with pytest.raises(JobCancelledError):
            queued.wait(1)
        assert queue.cancel(running.id)
        engine.gate.set()
        with pytest.raises(JobCancelledError):
            running.wait(10)
        assert running.state is JobState.CANCELLED
        after.wait(10)
        assert not queue.cancel(after.id)  # finished
        assert not queue.cancel("no-such-id")
    assert engine.order == ["running", "after"]


def test_interrupt_keeps_finished_batches_and_skip_drops_one() -> None:
    engine = FakeEngine(step_time=0.02)
    with JobQueue(engine) as queue:
        job = queue.submit(req("p", steps=10, n_iter=3, seed=100))
        while job.progress.batch_index < 1:
            time.sleep(0.005)
        queue.interrupt()
        result = job.wait(10)
        assert job.state is JobState.DONE and job.interrupted
        assert result.seeds == [100]
        job = queue.submit(req("p", steps=10, n_iter=3, seed=100))
        while job.progress.step < 1:
            time.sleep(0.005)
        queue.skip()
        result = job.wait(10)
        assert result.seeds == [101, 102] and not job.interrupted
    assert not queue.interrupt() and not queue.skip()  # nothing running


def test_failure_fails_only_that_job() -> None:
    engine = FakeEngine()
    with JobQueue(engine) as queue:
        bad = queue.submit(req("boom"))
        good = queue.submit(req("fine"))
        with pytest.raises(RuntimeError, match="NaN"):
            bad.wait(10)
        assert good.wait(10).seeds == [1]
    assert bad.state is JobState.FAILED and "NaN" in bad.snapshot()["error"]


def test_simulated_oom_on_real_engine_next_job_succeeds(engine) -> None:
    import torch

    oom = OOMEngine(engine)
    with JobQueue(oom) as queue:
        bad = queue.submit(req("OOM please", width=64, height=64, steps=2))
        good = queue.submit(req("a red fox", width=64, height=64, steps=2, seed=5))
        with pytest.raises(torch.OutOfMemoryError):
            bad.wait(60)
        result = good.wait(60)
    assert oom.failures == 1 and bad.state is JobState.FAILED
    expected = engine.generate(req("a red fox", width=64, height=64, steps=2, seed=5), progress_bar=False)
    assert result.seeds == [5]
    assert (result.pixels == expected.pixels).all()


def test_cancel_running_real_engine(engine) -> None:
    with JobQueue(SlowEngine(engine, delay=0.05)) as queue:
        job = queue.submit(req("slow", width=64, height=64, steps=20, n_iter=5))
        while job.progress.step < 1:
            time.sleep(0.01)
        t0 = time.monotonic()
        queue.cancel(job.id)
        with pytest.raises(JobCancelledError):
            job.wait(30)
        assert time.monotonic() - t0 < 5


def test_shutdown_answers_queued_jobs_and_refuses_new_ones() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    queue = JobQueue(engine).start()
    running = queue.submit(req("running", steps=3))
    assert engine.started.wait(5)
    queued = [queue.submit(req(f"q{i}")) for i in range(3)]
    threading.Timer(0.2, engine.gate.set).start()
    assert queue.shutdown(timeout=10)
    assert running.wait(1).seeds == [1]  # the running job finished
    for job in queued:
        with pytest.raises(JobCancelledError, match="shutting down"):
            job.wait(1)
    with pytest.raises(QueueClosedError):
        queue.submit(req("late"))
    assert engine.order == ["running"]


def test_shutdown_timeout_cancels_running_job() -> None:
    engine = FakeEngine(step_time=0.05)
    queue = JobQueue(engine).start()
    job = queue.submit(req("long", steps=10_000))
    assert engine.started.wait(5)
    t0 = time.monotonic()
    assert queue.shutdown(timeout=0.3)
    assert time.monotonic() - t0 < 5
    with pytest.raises(JobCancelledError):
        job.wait(1)


def test_max_queue_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        JobQueue(FakeEngine(), max_queue=0)
