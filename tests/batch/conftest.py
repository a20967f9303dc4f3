"""One real single-node Ray cluster for the Ray tests only: started on first use, shut down at the end.

Two CPUs and two logical GPUs (a CPU machine can test one-actor-per-GPU scheduling); the workers
import this checkout (PYTHONPATH) and use one torch thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'leansd[ray]')")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
