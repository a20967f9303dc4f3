"""Web UI hardening: a closed stream cancels its job, scratch files go at shutdown, uploads are bounded."""

from __future__ import annotations

import time

from leansd.request import GenerationRequest
from leansd.service.queue import JobQueue
from tests.service.conftest import LiveServer, SlowEngine


def test_closed_stream_cancels_the_job(engine) -> None:
    from leansd.frontends.http import DEFAULT_MAX_IMAGES, Limits
    from leansd.frontends.webui import _Runner

    limits = Limits(max_size=512, max_steps=150, max_images=DEFAULT_MAX_IMAGES)
    request = GenerationRequest("a fox", width=64, height=64, num_inference_steps=100, seed=1).validated()
    with JobQueue(SlowEngine(engine, delay=0.05)) as queue:
        runner = _Runner(queue, model_name="tiny", limits=limits, save_dir=None)
        updates = runner.run(request, task="txt2img", session="alice")
        texts = []
        while not texts or not texts[-1].startswith("Step "):
            texts.append(next(updates)[-1])
        job = queue.current
        assert job is not None and job.state.value == "running"
        updates.close()  # what Gradio does when the browser closes the stream
        deadline = time.monotonic() + 10
        while not job.state.finished and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.state.value == "cancelled" and job.progress.step < 100
        assert runner.cancel("alice") == "nothing to cancel"


def test_scratch_folder_is_removed_at_shutdown(engine) -> None:
    from gradio_client import Client

    from leansd.frontends.http import create_app

    app = create_app(engine, max_queue=4, max_size=512)
    server = LiveServer(app).__enter__()
    try:
        client = Client(server.url + "/", verbose=False, download_files=False)
        gallery, *_ = client.predict("a fox", "", "Euler a", 2, 7.0, 64, 64, 1, 1, 7, api_name="/txt2img")
        assert len(gallery) == 1
        runner = app.state.cleanups[0].__self__
        scratch = runner._scratch
        assert scratch is not None and scratch.is_dir() and any(scratch.rglob("*.png"))
    finally:
        server.__exit__()
    assert not scratch.exists()


def test_large_upload_is_refused(engine, live_server) -> None:
    import httpx

    from leansd.frontends.http import create_app

    server = live_server(create_app(engine, max_body=2**20, max_size=512))
    files = {"files": ("big.png", b"\x89PNG" + b"\0" * (2 * 2**20), "image/png")}
    answer = httpx.post(f"{server.url}/gradio_api/upload", files=files, timeout=30)
    assert answer.status_code == 413 and answer.json()["error"] == "PayloadTooLarge"
    small = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("s.png", b"\x89PNG" + b"\0" * 1000)},
                       timeout=30)
    assert small.status_code == 200


def test_client_that_leaves_through_gradio_cancels_the_job(engine) -> None:
    from gradio_client import Client

    from leansd.frontends.http import create_app

    with JobQueue(SlowEngine(engine, delay=0.1)) as queue:
        server = LiveServer(create_app(queue, max_size=512)).__enter__()
        try:
            client = Client(server.url + "/", verbose=False, download_files=False)
            job = client.submit("a fox", "", "Euler a", 100, 7.0, 64, 64, 1, 1, 7, api_name="/txt2img")
            deadline = time.monotonic() + 30
            while (queue.current is None or queue.current.progress.step < 2) and time.monotonic() < deadline:
                time.sleep(0.05)
            running = queue.current
            assert running is not None
            job.cancel()  # Gradio stops the event, which closes the UI's generator
            deadline = time.monotonic() + 10
            while not running.state.finished and time.monotonic() < deadline:
                time.sleep(0.05)
            assert running.state.value == "cancelled" and running.progress.step < 50
        finally:
            server.__exit__()
