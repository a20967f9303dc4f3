"""A real headless Chromium (Debian's /usr/bin/chromium via Playwright) uses the page as a person would.

The browser is installed by `make test` (target install-browser, `apt-get install chromium`), never
downloaded by `playwright install`. Set LEANSD_SCREENSHOT=1 to refresh docs/screenshot-webui.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LEANSD_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot-webui.png"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} is missing: run `make install-browser` (apt-get install chromium) to run this test",
)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


def test_generate_in_the_browser(ui_server, browser, tmp_path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    remote = []
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith((ui_server.url, "data:", "blob:"))
            else None)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(ui_server.url + "/", wait_until="networkidle", timeout=60_000)
    page.locator("#txt2img_prompt textarea").fill("a lighthouse at dusk, oil painting")
    page.locator("#txt2img_negative_prompt textarea").fill("blurry")
    page.locator("#txt2img_generate").click()
    # The job ends when its infotext arrives (live previews may show in the gallery before that)
    page.wait_for_function(
        "() => document.querySelector('#txt2img_infotext textarea').value.includes('Seed:')", timeout=60_000)
    image = page.locator("#txt2img_gallery img").first
    image.wait_for(state="visible", timeout=60_000)
    page.wait_for_function(
        "() => { const i = document.querySelector('#txt2img_gallery img'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )
    size = page.evaluate("() => { const i = document.querySelector('#txt2img_gallery img');"
                         " return [i.naturalWidth, i.naturalHeight]; }")
    default = ui_server.queue.engine.bundle.default_size or 512
    assert size == [default, default]
    page.wait_for_function(
        "() => document.querySelector('#txt2img_infotext textarea').value.includes('Seed:')", timeout=30_000)
    infotext = page.locator("#txt2img_infotext textarea").input_value()
    assert infotext.startswith("a lighthouse at dusk, oil painting\nNegative prompt: blurry\n")
    assert "image" in page.locator("#txt2img_progress").inner_text()
    shot = tmp_path / "webui.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    if os.environ.get("LEANSD_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)
    assert not remote, f"the page fetched remote resources (it must work offline): {remote[:5]}"
    assert not errors, errors
    page.close()


def test_validation_error_is_shown_in_the_page(ui_server, browser) -> None:
    page = browser.new_page()
    page.goto(ui_server.url + "/", wait_until="networkidle", timeout=60_000)
    page.locator("#txt2img_prompt textarea").fill("x")
    width = page.locator("#txt2img_width input[type=number]")
    width.fill("100")
    width.press("Enter")
    page.locator("#txt2img_generate").click()
    toast = page.get_by_text("multiple of 8").first
    toast.wait_for(state="visible", timeout=30_000)
    assert "Traceback" not in page.content()
    page.close()
