"""The job queue: one worker owns the engine (and the GPU); ids, progress, cancel, graceful shutdown."""

from leansd.service.queue import (
    DEFAULT_MAX_QUEUE,
    Job,
    JobCancelledError,
    JobProgress,
    JobQueue,
    JobState,
    JobTooLongError,
    QueueClosedError,
    QueueFullError,
)

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "Job",
    "JobCancelledError",
    "JobProgress",
    "JobQueue",
    "JobState",
    "JobTooLongError",
    "QueueClosedError",
    "QueueFullError",
]
