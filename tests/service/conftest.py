"""Fixtures for the server tests: one tiny CPU engine, fake engines, and live uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

import pytest

from tests.helpers import tiny_bundle


@pytest.fixture(scope="session")
def engine():
    from leansd.engine.engine import Engine

    return Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def queue(self):
        return self.app.state.queue


@pytest.fixture
def live_server() -> Callable[..., LiveServer]:
    """`live_server(app)` -> a started LiveServer; stopped at the end of the test."""
    started: list[LiveServer] = []

    def start(app: Any) -> LiveServer:
        server = LiveServer(app).__enter__()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.__exit__()


@pytest.fixture
def server(engine, live_server) -> Iterator[LiveServer]:
    """A live server over the shared tiny engine with default options."""
    from leansd.frontends.http import create_app

    yield live_server(create_app(engine, max_queue=32))


class OOMEngine:
    """Wraps a real engine; a prompt containing "OOM" raises torch.OutOfMemoryError at its first step."""

    def __init__(self, engine: Any) -> None:
        self.inner = engine
        self.bundle = engine.bundle
        self.device = engine.device
        self.failures = 0

    def generate(self, request, *, progress=None, progress_bar=True):
        import torch

        def on_step(event):
            if "OOM" in request.prompt:
                self.failures += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            if progress is not None:
                progress(event)

        return self.inner.generate(request, progress=on_step, progress_bar=progress_bar)


class SlowEngine:
    """Wraps a real engine and sleeps `delay` seconds per step (to hold jobs in the queue)."""

    def __init__(self, engine: Any, delay: float = 0.05) -> None:
        self.inner = engine
        self.bundle = engine.bundle
        self.device = engine.device
        self.delay = delay

    def generate(self, request, *, progress=None, progress_bar=True):
        def on_step(event):
            time.sleep(self.delay)
            if progress is not None:
                progress(event)

        return self.inner.generate(request, progress=on_step, progress_bar=progress_bar)
