"""Shared pieces of the browser tests: headless Debian Chromium through Playwright, and helpers to read the page."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from dalle_app.service import read_parameters

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (skipped when Debian's chromium is missing)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium); browser test skipped")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str):
    """A new page of the app at `url`, in a window large enough for two columns."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    return page


def wait_images(page, gallery: str, count: int, info: str | None = None):
    """Wait until `gallery` shows at least `count` images (and `info` shows the seeds)."""
    page.wait_for_function(f"() => document.querySelectorAll('{gallery} img').length >= {count}", timeout=30000)
    if info:
        page.locator(info).get_by_text('"seeds"').wait_for(timeout=30000)


def gallery_parameters(page, gallery: str = "#gallery") -> list[dict]:
    """The parameters stored in the PNGs the gallery shows (fetched as the browser gets them)."""
    sources = page.evaluate(f"() => [...document.querySelectorAll('{gallery} img')].map(i => i.src)")
    return [read_parameters(io.BytesIO(page.request.get(src).body())) for src in sources]


def watch_progress(page, selector: str):
    """Record every text the progress bar shows from now on (window.progressSeen)."""
    page.evaluate("""(sel) => { window.progressSeen = []; new MutationObserver(() => {
        const bar = document.querySelector(sel + ' [role=progressbar]');
        if (bar) window.progressSeen.push(bar.getAttribute('aria-valuenow') + '|' + bar.innerText); })
        .observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true}); }""",
                  selector)


def fill(box, value, settle_s: float = 0.3, tries: int = 5) -> None:
    """Type `value` into the text box `box` (a locator) and make sure it stays there, as a person would.

    Gradio mounts the components of a closed accordion or an unselected tab when it opens, and in the first moments
    of a cold page their initial value can replace what was just typed (seen: the model reference box showed the
    default path again and Load loaded the default model)."""
    value = str(value)
    for _ in range(tries):
        box.fill(value)
        time.sleep(settle_s)
        if box.input_value() == value:
            return
    raise AssertionError(f"the box kept losing what was typed: {value!r} became {box.input_value()!r}")


def set_slider(page, elem_id: str, value: float):
    """Type `value` into the number box of the slider with `elem_id`."""
    box = page.locator(f"#{elem_id} input[type=number]")
    fill(box, value)
    box.press("Enter")

