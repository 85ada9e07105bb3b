"""`--concurrency 2`: two model workers really compute at once, through the running app, and neither request sees
the other's images or seeds. The app runs through tests/reliability_launcher.py, whose decoding steps sleep
(DALLE_TEST_STEP_DELAY), so two workers can overlap on a small shared CPU."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("youtokentome")
gradio_client = pytest.importorskip("gradio_client")
from PIL import Image

from reliability_server import start_app, stop_app

STEP_DELAY = 0.004  # seconds per image per decoding step: 8 images take ~2 s
IMAGES = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_workers")
    proc, url, folder = start_app(root, "--concurrency", "2", env={"DALLE_TEST_STEP_DELAY": str(STEP_DELAY)},
                                  faults=True)
    yield url, root, folder
    stop_app(proc)


def _pixels(files):
    return [list(Image.open(f["image"] if isinstance(f, dict) else f).getdata()) for f in files]


def test_two_workers_compute_two_requests_at_once_without_mixing_them(server):
    url, _, _ = server
    clients = [gradio_client.Client(url, verbose=False) for _ in range(2)]
    requests = [("a blue square", 100), ("a red circle", 200)]

    def ask(i):
        prompt, seed = requests[i]
        start = time.perf_counter()
        files, info = clients[i].predict(prompt, IMAGES, 1.0, 16, 1.0, seed, api_name="/text_to_image")
        return files, info, time.perf_counter() - start

    alone = [ask(i) for i in range(2)]  # one after the other: each has the model to itself
    with ThreadPoolExecutor(2) as pool:
        start = time.perf_counter()
        together = list(pool.map(ask, range(2)))
        both_s = time.perf_counter() - start
    one_s = max(t for _, _, t in alone)
    print(f"\n[workers] {IMAGES} images alone: {one_s:.2f} s; two such requests at once with 2 workers: {both_s:.2f} s")
    # one worker would take their sum (fair turns interleave them); two overlap
    assert both_s < 0.75 * sum(t for _, _, t in alone), (both_s, [t for _, _, t in alone])
    for (files, info, _), (alone_files, alone_info, _), (_, seed) in zip(together, alone, requests):
        assert info["seeds"] == alone_info["seeds"] == list(range(seed, seed + IMAGES))
        assert _pixels(files) == _pixels(alone_files)  # the same images as when each ran alone
