"""Batch generation: a job file in, `OUTDIR/<id>-<k>.png` and `manifest.jsonl` out, locally or on Ray.

    from leansd.batch import read_jobs, run_batch, LocalBackend, BatchWorker
    jobs = read_jobs("jobs.jsonl", model="model.safetensors", seed=1)
    summary = run_batch(jobs, outdir=Path("out"), backend=LocalBackend(BatchWorker()))

See docs/BATCH.md. Names are imported lazily so importing the package costs nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchSummary", "BatchWorker", "JobFile", "JobLine", "LocalBackend", "read_jobs", "run_batch"]

_LAZY = {
    "BatchSummary": "leansd.batch.runner",
    "LocalBackend": "leansd.batch.runner",
    "run_batch": "leansd.batch.runner",
    "BatchWorker": "leansd.batch.worker",
    "JobFile": "leansd.batch.jobs",
    "JobLine": "leansd.batch.jobs",
    "read_jobs": "leansd.batch.jobs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leansd.batch' has no attribute {name!r}")
