"""Live previews over HTTP: `/sdapi/v1/progress` `current_image` and A1111's preview options, driven by
the real `webuiapi` client."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from leansd.request import GenerationRequest

from .conftest import SlowEngine

webuiapi = pytest.importorskip("webuiapi")


def _api(server) -> "webuiapi.WebUIApi":
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=8)


def _run_in_background(api, **fields) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(api.txt2img(prompt="a red fox", seed=5, width=64, height=64,
                                                                   **fields)))
    thread.start()
    return thread, out


def _first_preview(api, thread) -> dict:
    """Poll /progress until it carries a current_image (or the job ends)."""
    while thread.is_alive():
        progress = api.get_progress()
        if progress["current_image"]:
            return progress
        time.sleep(0.02)
    raise AssertionError("the job ended before /progress showed a preview")


def _png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_defaults_follow_the_library(server) -> None:
    from leansd.request import DEFAULT_PREVIEW_EVERY

    options = _api(server).get_options()
    assert options["live_previews_enable"] is True
    assert options["show_progress_every_n_steps"] == DEFAULT_PREVIEW_EVERY == 10
    assert options["live_preview_content"] == "Combined" and options["show_progress_type"] == "Approx cheap"


def test_progress_shows_the_running_jobs_preview(engine, live_server) -> None:
    from leansd.frontends.http import create_app

    server = live_server(create_app(SlowEngine(engine, delay=0.15), ui=False))
    api = _api(server)
    api.set_options({"show_progress_every_n_steps": 2, "live_preview_content": "Negative prompt"})
    thread, out = _run_in_background(api, negative_prompt="blurry")
    progress = _first_preview(api, thread)
    preview = _png(progress["current_image"])
    assert preview.format == "PNG" and preview.size == (8, 8)  # Approx cheap: 1/8 of 64x64
    assert progress["state"]["sampling_step"] >= 2
    skipped = httpx.get(f"{server.url}/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
    assert skipped["current_image"] is None and skipped["state"]["job_count"] == 1
    thread.join(60)
    assert len(out[0].images) == 1
    after = api.get_progress()
    assert after["current_image"] is None and after["state"]["job_count"] == 0  # never outlives its job


def test_previews_off(engine, live_server) -> None:
    from leansd.frontends.http import create_app

    server = live_server(create_app(SlowEngine(engine, delay=0.05), ui=False))
    api = _api(server)
    api.set_options({"live_previews_enable": False, "show_progress_every_n_steps": 1})
    thread, _ = _run_in_background(api)
    seen = []
    while thread.is_alive():
        progress = api.get_progress()
        seen.append((progress["state"]["job_count"], progress["current_image"]))
        time.sleep(0.02)
    assert any(count for count, _ in seen) and not any(image for _, image in seen)


def test_taesd_previews_are_full_size(tmp_path, live_server) -> None:
    from leansd.engine.engine import Engine
    from leansd.frontends.http import create_app
    from leansd.models.taesd import load_taesd
    from tests.helpers import tiny_bundle, write_tiny_taesd

    write_tiny_taesd(tmp_path)
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, taesd=load_taesd(tmp_path))
    slow = SlowEngine(engine, delay=0.15)
    slow.taesd = engine.taesd
    server = live_server(create_app(slow, ui=False))
    api = _api(server)
    api.set_options({"show_progress_every_n_steps": 1, "show_progress_type": "TAESD"})
    thread, _ = _run_in_background(api)
    assert _png(_first_preview(api, thread)["current_image"]).size == (64, 64)
    thread.join(60)


@pytest.mark.parametrize("options, message", [
    ({"show_progress_type": "TAESD"}, "show_progress_type TAESD needs TAESD weights: start the server with --taesd"),
    ({"show_progress_type": "Approx NN"}, "show_progress_type 'Approx NN' is not available; valid: Approx cheap, TAESD, Full"),
    ({"live_preview_content": "Both"}, "live_preview_content 'Both' is not available; valid: Combined, Prompt, Negative prompt"),
    ({"show_progress_every_n_steps": "10"}, "show_progress_every_n_steps must be an integer from -1"),
    ({"show_progress_every_n_steps": -2}, "show_progress_every_n_steps must be an integer from -1"),
    ({"live_previews_enable": "yes"}, "live_previews_enable must be true or false"),
])
def test_bad_preview_options_are_refused_and_change_nothing(server, options, message) -> None:
    before = _api(server).get_options()
    response = httpx.post(f"{server.url}/sdapi/v1/options", json={**options, "samples_format": "jpg"})
    assert response.status_code == 400 and message in response.json()["detail"]
    assert _api(server).get_options() == before


def test_override_settings_per_request(server) -> None:
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=60, json={
        "prompt": "x", "steps": 2, "width": 64, "height": 64,
        "override_settings": {"show_progress_type": "TAESD"},
    })
    assert response.status_code == 400 and "TAESD needs TAESD weights" in response.json()["detail"]


def test_progress_encodes_each_preview_once(engine) -> None:
    """Clients poll /progress often: the same preview is PNG-encoded once, a new one again."""
    from leansd.frontends import a1111
    from leansd.request import ProgressEvent
    from leansd.service import JobQueue
    from leansd.service.queue import Job

    class Queue(JobQueue):
        running: Job | None = None

        @property
        def current(self):
            return self.running

    queue = Queue(engine)
    job = Job(GenerationRequest(prompt="x"))
    queue.running = job
    cache: dict = {}
    assert a1111.progress(queue, cache=cache)["current_image"] is None
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    job._on_progress(ProgressEvent(1, 4, 0, 1, preview=red))
    first = a1111.progress(queue, cache=cache)["current_image"]
    assert _png(first).getpixel((0, 0)) == (255, 0, 0) and cache["key"] == (job.id, 1)
    cache["png"] = "still cached"
    assert a1111.progress(queue, cache=cache)["current_image"] == "still cached"
    assert a1111.progress(queue, cache=cache, skip_current_image=True)["current_image"] is None
    job._on_progress(ProgressEvent(2, 4, 0, 1, preview=blue))
    assert _png(a1111.progress(queue, cache=cache)["current_image"]).getpixel((0, 0)) == (0, 0, 255)
