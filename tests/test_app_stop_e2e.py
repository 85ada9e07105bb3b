"""End to end, with slow decoding steps: the place in Gradio's queue, Stop while running (partial images) and
while queued (the request never computes), and live previews in the gallery, in headless Chromium.

The app runs through tests/reliability_launcher.py, which sleeps in every decoding step (no CPU used) and logs the
steps it ran by batch rows, with one request computing at a time (--max-active 1)."""

import json
import re
import time

import pytest

pytest.importorskip("youtokentome")

from browser_helpers import browser, fill, gallery_parameters, open_page, set_slider  # noqa: F401
from reliability_server import start_app, stop_app

STEP_DELAY = 0.03  # seconds per image per decoding step: a request of the tiny model takes about 2 s per image


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow-app")
    steps = root / "steps.json"
    proc, url, _ = start_app(root, "--max-active", "1", faults=True,
                             env={"DALLE_TEST_STEP_DELAY": str(STEP_DELAY), "DALLE_TEST_STEP_LOG": str(steps)})
    yield url, steps
    stop_app(proc)


def _steps_by_rows(steps) -> dict[int, int]:
    """{batch rows: decoding steps run} so far (the launcher rewrites the file every 0.05 s)."""
    time.sleep(0.15)
    return {int(rows): count for rows, (count, _) in json.loads(steps.read_text()).items()}


def _ready(page, prompt: str, images: int):
    fill(page.get_by_label("Prompt", exact=True), prompt)
    set_slider(page, "t2i-n", images)


def test_browser_shows_the_place_in_the_queue_and_stop_returns_partial_images(slow_server, browser):
    url, _ = slow_server
    pages = [open_page(browser, url) for _ in range(2)]
    _ready(pages[0], "a blue square", 4)  # about 8 s unless stopped: time enough for the second page to queue
    _ready(pages[1], "a blue square", 1)
    pages[0].locator("#generate").click()
    pages[0].wait_for_function("() => document.querySelector('#progress [role=progressbar]')", timeout=30000)
    pages[1].locator("#generate").click()  # waits behind the first: Gradio shows its place
    pages[1].locator("#progress").get_by_text(re.compile(r"queue: 1/\d")).wait_for(timeout=10000)
    pages[0].locator("#stop").click()
    pages[0].locator("#progress").get_by_text("stopped").wait_for(timeout=10000)
    stopped = gallery_parameters(pages[0])
    assert len(stopped) == 4 and not any(p["settings"]["completed"] for p in stopped)  # the partial images, saved
    pages[1].locator("#progress").get_by_text("done").wait_for(timeout=30000)
    finished = gallery_parameters(pages[1])
    assert len(finished) == 1 and finished[0]["settings"]["completed"] is True
    for page in pages:
        page.close()


def _queue_size(page, url: str) -> int:
    """How many requests wait in Gradio's queue (not counting the running ones)."""
    return page.request.get(f"{url}gradio_api/queue/status").json()["queue_size"]


def test_browser_stop_while_queued_ends_the_request_without_computing(slow_server, browser):
    url, steps = slow_server
    pages = [open_page(browser, url) for _ in range(2)]
    _ready(pages[0], "a blue square", 4)  # stopped early below
    _ready(pages[1], "a red circle", 3)  # the only request with 3 rows: the step log tells whether it computed
    pages[0].locator("#generate").click()
    pages[0].wait_for_function("() => document.querySelector('#progress [role=progressbar]')", timeout=30000)
    pages[1].locator("#generate").click()
    pages[1].locator("#progress").get_by_text(re.compile(r"queue: 1/\d")).wait_for(timeout=10000)
    assert _queue_size(pages[1], url) == 1
    pages[1].locator("#stop").click()
    pages[1].locator("#progress").get_by_text("stopped before it started").wait_for(timeout=5000)
    deadline = time.time() + 3
    while _queue_size(pages[1], url) and time.time() < deadline:
        time.sleep(0.1)
    assert _queue_size(pages[1], url) == 0  # it left the queue at once...
    signal = pages[1].locator("#t2i-cancel-signal")
    assert signal.count() == 1 and not signal.is_visible()  # the hidden component whose change cancelled it
    running = pages[0].locator("#progress").inner_text()
    assert "done" not in running and "stopped" not in running  # ...while the request in front still ran

    pages[0].locator("#stop").click()
    pages[0].locator("#progress").get_by_text("stopped").wait_for(timeout=10000)
    set_slider(pages[1], "t2i-n", 1)
    fill(pages[1].get_by_label("Seed (-1 = random)").first, "77")
    pages[1].locator("#generate").click()  # Stop is not sticky: the next Generate runs to the end
    pages[1].locator("#gallery img[src*='-seed77.png']").wait_for(timeout=30000)
    pages[1].locator("#progress").get_by_text("done").wait_for(timeout=10000)
    assert 3 not in _steps_by_rows(steps)  # the stopped request never ran a decoding step
    assert [p["seed"] for p in gallery_parameters(pages[1])] == [77]
    for page in pages:
        page.close()


def test_browser_gallery_shows_live_previews_before_the_final_images(slow_server, browser):
    url, _ = slow_server
    page = open_page(browser, url)
    _ready(page, "a green triangle", 1)
    page.evaluate("""() => { window.shown = []; new MutationObserver(() => {
        const srcs = [...document.querySelectorAll('#gallery img')].map(i => i.src).join(' ');
        const bar = document.querySelector('#progress [role=progressbar]');
        const last = window.shown[window.shown.length - 1];
        if (srcs && (!last || last.srcs !== srcs))
            window.shown.push({srcs, percent: bar ? Number(bar.getAttribute('aria-valuenow')) : null}); })
        .observe(document.body, {subtree: true, childList: true, attributes: true}); }""")
    page.locator("#generate").click()
    page.locator("#progress").get_by_text("done").wait_for(timeout=30000)
    shown = page.evaluate("() => window.shown")
    final = shown[-1]
    assert re.search(r"-seed\d+\.png$", final["srcs"]) and final["percent"] == 100, shown  # the written PNG
    previews = [s for s in shown[:-1] if "-seed" not in s["srcs"]]
    assert len(previews) == len(shown) - 1 and len(previews) >= 3, shown  # several previews, then the final one
    assert all(p["percent"] is None or p["percent"] < 100 for p in previews), shown
    assert any(p["percent"] and p["percent"] >= 25 for p in previews), shown  # previews while it computed
    page.close()
