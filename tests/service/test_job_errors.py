"""A job that fails with one of leansd's own errors answers one JSON line over HTTP, never a bare 500."""

from __future__ import annotations

from typing import Any

import httpx

from leansd.engine.device import missing_kernel_error
from leansd.errors import OutputError
from leansd.frontends.http import create_app


class RaisingEngine:
    """Wraps the tiny engine; generate raises `error` (what Engine.generate raises on such a failure)."""

    def __init__(self, engine: Any, error: Exception) -> None:
        self.inner = engine
        self.bundle = engine.bundle
        self.device = engine.device
        self.error = error

    def generate(self, request, *, progress=None, progress_bar=True):
        raise self.error


def test_a_gpu_without_kernels_answers_one_json_line(engine, live_server) -> None:
    # Engine.generate turns CUDA's "no kernel image is available" into this error.
    error = missing_kernel_error((6, 1), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_120"], "2.13.0+cu130",
                                 name="NVIDIA GeForce GTX 1060 6GB")
    server = live_server(create_app(RaisingEngine(engine, error), ui=False))
    base = server.url + "/sdapi/v1"
    answer = httpx.post(f"{base}/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64}, timeout=60)
    assert answer.status_code == 500
    body = answer.json()
    assert body["error"] == "UnsupportedGPUError"
    assert body["detail"] == str(error)
    assert "TORCH=cu126" in body["detail"] and "\n" not in body["detail"]
    # The server lives on: the next request is answered (and fails the same way, in one line).
    again = httpx.post(f"{base}/txt2img", json={"prompt": "y", "steps": 2, "width": 64, "height": 64}, timeout=60)
    assert again.status_code == 500 and again.json()["error"] == "UnsupportedGPUError"


def test_an_output_error_in_a_job_answers_one_json_line(engine, live_server) -> None:
    server = live_server(create_app(RaisingEngine(engine, OutputError("cannot write /x/y.png: disk full")), ui=False))
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64}, timeout=60)
    assert answer.status_code == 500
    assert answer.json() == {"error": "OutputError", "detail": "cannot write /x/y.png: disk full"}
