"""Fixtures for the web UI tests: the tiny engine and live servers from tests/service, a gradio_client."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.service.conftest import LiveServer, engine, live_server  # noqa: F401 - fixtures reused


@pytest.fixture(scope="module")
def ui_server() -> Iterator[LiveServer]:
    """One live server (API + web UI at /) over a tiny engine, shared by a test module."""
    from leansd.engine.engine import Engine
    from leansd.frontends.http import create_app
    from tests.helpers import tiny_bundle

    tiny_engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False)
    server = LiveServer(create_app(tiny_engine, max_queue=8, max_size=512)).__enter__()
    yield server
    server.__exit__()


@pytest.fixture(scope="module")
def client(ui_server):
    from gradio_client import Client

    return Client(ui_server.url + "/", verbose=False, download_files=True)
