"""Live previews in the web UI: the session's own job's preview shows in the gallery while it runs,
and goes when the job ends (results replace it; a cancel empties the gallery)."""

from __future__ import annotations

import os

import pytest

from leansd.service.queue import JobQueue
from tests.service.conftest import SlowEngine
from tests.webui.test_browser import ARGS, CHROMIUM, browser  # noqa: F401 - fixture reused


def _runner(queue, options=None):
    from leansd.frontends.a1111 import Limits
    from leansd.frontends.webui import _Runner

    return _Runner(queue, model_name="tiny", limits=Limits(max_size=512), save_dir=None, options=options)


def _request(runner, steps):
    from leansd.frontends.a1111 import Txt2ImgRequest, txt2img_request

    body = Txt2ImgRequest(prompt="a fox", steps=steps, width=64, height=64, seed=1, sampler_name="Euler")
    return runner.build(txt2img_request, body)


def test_gallery_shows_previews_then_the_result(engine) -> None:
    import gradio as gr

    with JobQueue(SlowEngine(engine, delay=0.1)) as queue:
        runner = _runner(queue, {"show_progress_every_n_steps": 2})
        request = _request(runner, 6)
        assert request.preview_every == 2 and request.preview_method == "approx-cheap"
        updates = list(runner.run(request, task="txt2img", session="alice"))
    previews = [u[0] for u in updates[:-1] if not isinstance(u[0], type(gr.skip()))]
    assert previews, "no preview reached the gallery while the job ran"
    for gallery in previews:
        (image, caption), = gallery
        assert image.size == (8, 8) and caption.startswith("Preview, step ")
    final = updates[-1][0]
    assert len(final) == 1 and final[0][0].endswith(".png") and "Seed: 1" in final[0][1]


def test_options_turn_previews_off_for_the_ui(engine) -> None:
    with JobQueue(engine) as queue:
        runner = _runner(queue, {"live_previews_enable": False})
        assert _request(runner, 4).preview_every == 0
        assert _request(_runner(queue), 20).preview_every == 10  # A1111's default: every 10 steps


def test_cancel_empties_the_gallery(engine) -> None:
    import gradio as gr

    with JobQueue(SlowEngine(engine, delay=0.05)) as queue:
        runner = _runner(queue, {"show_progress_every_n_steps": 1})
        updates = runner.run(_request(runner, 40), task="txt2img", session="alice")
        while not isinstance(next(updates)[0], list):
            pass
        assert runner.cancel("alice") == "cancelling..."
        seen = []
        with pytest.raises(gr.Error, match="cancelled"):
            for update in updates:
                seen.append(update[0])
        assert seen[-1] == []  # the preview does not outlive the job


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is missing: run `make install-browser`")
def test_browser_sessions_see_only_their_own_preview(engine, live_server, browser) -> None:  # noqa: F811
    import httpx

    from leansd.frontends.http import create_app

    server = live_server(create_app(SlowEngine(engine, delay=0.4), max_queue=8, max_size=512))
    httpx.post(f"{server.url}/sdapi/v1/options", json={"show_progress_every_n_steps": 2}).raise_for_status()
    pages = []
    for prompt, steps in (("a fox", "10"), ("a cat", "2")):
        page = browser.new_context().new_page()  # one context each: two separate sessions
        page.goto(server.url + "/", wait_until="networkidle", timeout=60_000)
        page.locator("#txt2img_prompt textarea").fill(prompt)
        box = page.locator("#txt2img_steps input[type=number]")
        box.fill(steps)
        box.press("Enter")
        pages.append(page)
    first, second = pages
    first.locator("#txt2img_generate").click()
    first.locator("#txt2img_progress").get_by_text("Step ").wait_for(timeout=30_000)
    second.locator("#txt2img_generate").click()  # waits in the queue behind the first job
    # A preview appears in the first page while its job still runs (its progress still says "Step")
    first.wait_for_function(
        "() => { const i = document.querySelector('#txt2img_gallery img');"
        " return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
    state = first.evaluate(
        "() => [document.querySelector('#txt2img_gallery img').naturalWidth,"
        " document.querySelector('#txt2img_progress').innerText]")
    assert state[0] == 8 and "Step " in state[1]  # Approx cheap of a 64x64 image, job not finished
    assert second.locator("#txt2img_gallery img").count() == 0  # the other session sees none of it
    # When the job ends the result replaces the preview
    first.wait_for_function(
        "() => document.querySelector('#txt2img_infotext textarea').value.includes('Seed:')", timeout=60_000)
    first.wait_for_function(
        "() => { const imgs = document.querySelectorAll('#txt2img_gallery img');"
        " return imgs.length === 1 && imgs[0].complete && imgs[0].naturalWidth === 64; }", timeout=30_000)
    second.wait_for_function(
        "() => document.querySelector('#txt2img_infotext textarea').value.includes('a cat')", timeout=60_000)
    second.wait_for_function(
        "() => { const imgs = document.querySelectorAll('#txt2img_gallery img');"
        " return imgs.length === 1 && imgs[0].complete && imgs[0].naturalWidth === 64; }", timeout=30_000)
    for page in pages:
        page.context.close()
