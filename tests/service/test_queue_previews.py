"""The queue keeps the running job's latest live preview, and drops it when the job ends."""

from __future__ import annotations

import numpy as np
import pytest

from leansd.request import GenerationRequest
from leansd.service import JobCancelledError, JobQueue, JobState


class Watching:
    """Wraps the real tiny engine; after each progress event records what the queue shows as running."""

    def __init__(self, engine) -> None:
        self.inner = engine
        self.bundle = engine.bundle
        self.device = engine.device
        self.queue: JobQueue | None = None
        self.seen: list[tuple[str, int, object, int]] = []
        self.cancel_at: int | None = None

    def generate(self, request, *, progress=None, progress_bar=True):
        def on_step(event):
            job = self.queue.current
            try:
                progress(event)
            finally:
                self.seen.append((request.prompt, event.step, job.preview, job.preview_id))
                if self.cancel_at == event.step:
                    self.queue.cancel(job.id)

        return self.inner.generate(request, progress=on_step, progress_bar=progress_bar)


def test_running_job_shows_its_latest_preview(engine):
    watcher = Watching(engine)
    with JobQueue(watcher) as queue:
        watcher.queue = queue
        first = queue.submit(GenerationRequest(prompt="with", sampler="Euler", seed=1, num_inference_steps=4,
                                               preview_every=2))
        second = queue.submit(GenerationRequest(prompt="without", sampler="Euler", seed=1, num_inference_steps=4))
        first.wait(60), second.wait(60)
    with_previews = [(step, preview, n) for prompt, step, preview, n in watcher.seen if prompt == "with"]
    assert [(step, preview is not None, n) for step, preview, n in with_previews] == [
        (1, False, 0), (2, True, 1), (3, True, 1), (4, True, 2)]
    assert with_previews[1][1].size == (8, 8)  # Approx cheap of a 64x64 image
    assert not np.array_equal(np.asarray(with_previews[1][1]), np.asarray(with_previews[3][1]))
    # the next job never shows the previous job's preview, and a finished job keeps none
    assert all(preview is None for prompt, _, preview, _ in watcher.seen if prompt == "without")
    assert first.preview is None and first.state is JobState.DONE


def test_cancelled_job_drops_its_preview(engine):
    watcher = Watching(engine)
    watcher.cancel_at = 2
    with JobQueue(watcher) as queue:
        watcher.queue = queue
        job = queue.submit(GenerationRequest(prompt="cancel me", sampler="Euler", seed=1, num_inference_steps=6,
                                             preview_every=1))
        with pytest.raises(JobCancelledError):
            job.wait(60)
    assert watcher.seen[1][2] is not None  # it had a preview while it ran
    assert job.state is JobState.CANCELLED and job.preview is None
