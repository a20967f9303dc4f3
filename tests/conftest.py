"""Test-suite settings: one torch thread (tiny ops slow down 30-60x when threads contend)."""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Keep caches (model hashes, ...) out of the user's home folder.
os.environ.setdefault("LEANSD_CACHE_DIR", tempfile.mkdtemp(prefix="leansd-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

torch.set_num_threads(1)
