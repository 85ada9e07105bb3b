"""Load through the running app: 16 gradio_client clients at once, isolation of seeds/prompts between them, the
queue bound (--queue-size), and the server's memory over 200 requests of every kind (uploads included). Figures are
printed (run with -s) for the README."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

import pytest

pytest.importorskip("youtokentome")
gradio_client = pytest.importorskip("gradio_client")

from PIL import Image

from dalle_app.service import read_parameters

from reliability_server import start_app, stop_app

CLIENTS = 16
BOUND_S = 120  # every one of the 16 requests answered within this (tiny model, 2 shared CPU cores)
WARM_UP = 40  # requests before memory is measured: caches, thread arenas, Gradio's upload folders settle
MEASURED = 160  # requests over which the growth is measured
# RSS growth allowed, as the least-squares slope of RSS against requests, sampled every 20 requests from the 20th
# measured one (the first 20 may still take a one-time step): 0.1-0.6 MB per 100 requests of this mix were measured
# on 2 shared CPU cores; a leak of 15 KB per request fails (Gradio 6.31 keeping a component per streamed output per
# request, when the API generators yielded gr.skip(), made 2.5 MB per 100)
GROWTH_BOUND_MB_PER_100 = 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_load")
    proc, url, _ = start_app(root)
    yield url, proc
    stop_app(proc)


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _paths(files):
    return [f["image"] if isinstance(f, dict) else f for f in files]


def test_sixteen_clients_at_once_are_all_answered_in_their_own_settings(server):
    url, _ = server
    clients = [gradio_client.Client(url, verbose=False) for _ in range(CLIENTS)]
    results, errors, ranks = {}, {}, {}

    def one(i: int):
        prompt = ["a red circle", "a blue square", "a green triangle", "a small yellow star"][i % 4] + f" {i}"
        count, seed = 1 + i % 2, 1000 * (i + 1)
        start = time.perf_counter()
        try:
            job = clients[i].submit(prompt, count, 1.0, 16, 1.0, seed, api_name="/text_to_image")
            seen = []
            while not job.done():
                status = job.status()
                if status.rank is not None:
                    seen.append(status.rank)
                time.sleep(0.05)
            files, info = job.result(timeout=BOUND_S)
            results[i] = (prompt, count, seed, _paths(files), info, time.perf_counter() - start)
            ranks[i] = seen
        except Exception as exc:  # noqa: BLE001 - reported below
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND_S + 30)
    wall = time.perf_counter() - wall
    assert not errors, errors
    assert len(results) == CLIENTS
    latencies = [r[-1] for r in results.values()]
    assert max(latencies) < BOUND_S
    for prompt, count, seed, paths, info, _ in results.values():
        assert info["seeds"] == [seed + j for j in range(count)] and len(paths) == count
        for j, path in enumerate(paths):
            params = read_parameters(path)
            assert params["prompt"] == prompt and params["seed"] == seed + j
            assert params["settings"]["num_images"] == count
    queued = [max(r) for r in ranks.values() if r]
    assert queued and max(queued) >= 1, "no client ever saw a queue position"
    print(f"\n[load] {CLIENTS} clients at once, 1-2 images each: all answered; wall {wall:.1f} s; latency "
          f"p50 {statistics.median(latencies):.2f} s, p95 {_percentile(latencies, 0.95):.2f} s, "
          f"max {max(latencies):.2f} s; highest queue position seen {max(queued)}")


def _slope_per_100(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of (request number, RSS MB), in MB per 100 requests."""
    x = np.array([n for n, _ in samples], dtype=float)
    y = np.array([mb for _, mb in samples], dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 100)


def test_memory_does_not_grow_over_requests_of_every_kind(server, tmp_path):
    url, proc = server
    client = gradio_client.Client(url, verbose=False)
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(4):
        path = tmp_path / f"upload{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        pictures.append(path)

    def request(i: int) -> None:
        kind, picture = i % 4, gradio_client.handle_file(str(pictures[i % len(pictures)]))
        if kind == 0:
            client.predict("a blue square", 1, 1.0, 16, 1.0, i, api_name="/text_to_image")
        elif kind == 1:
            client.predict("a red", 1, 1.0, 16, i, api_name="/complete_text")
        elif kind == 2:  # an upload, primed
            files, info = client.predict(picture, "a red circle", 4, 1, 1.0, 16, 1.0, i, api_name="/prime_image")
            assert info["seeds"] == [i] and len(files) == 1
        else:  # an upload, reconstructed
            files, info = client.predict(picture, api_name="/reconstruct")
            assert len(files) == 3

    for i in range(WARM_UP):
        request(i)
    before = _rss_mb(proc.pid)
    samples, latencies = [(0, before)], []
    for i in range(MEASURED):
        start = time.perf_counter()
        request(WARM_UP + i)
        latencies.append(time.perf_counter() - start)
        if i % 20 == 19:
            samples.append((i + 1, _rss_mb(proc.pid)))
    slope = _slope_per_100(samples[1:])
    growth = samples[-1][1] - before
    print(f"\n[memory] {MEASURED} requests after {WARM_UP} to warm up (text to image, completion, priming and "
          f"reconstruction of uploads in turn): latency p50 {statistics.median(latencies) * 1000:.0f} ms, p95 "
          f"{_percentile(latencies, 0.95) * 1000:.0f} ms; server RSS {before:.1f} MB -> {samples[-1][1]:.1f} MB "
          f"(growth {growth:+.1f} MB, slope {slope:+.2f} MB per 100 requests; every 20: "
          f"{[round(mb, 1) for _, mb in samples]})")
    assert slope < GROWTH_BOUND_MB_PER_100, (
        f"server RSS grows {slope:.2f} MB per 100 requests (bound {GROWTH_BOUND_MB_PER_100}): {samples}")


# ------------------------------------------------------------------------------------------ the queue bound

QUEUE_SIZE = 2
QUEUE_STEP_DELAY = 0.01  # seconds per image per decoding step: 4 images take ~2.6 s, one image ~0.65 s


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    """The app with --queue-size 2 and one request at a time on the model, its steps slowed down (sleeping)."""
    root = tmp_path_factory.mktemp("reliability_queue")
    env = {"DALLE_TEST_STEP_DELAY": str(QUEUE_STEP_DELAY), "DALLE_TEST_STEP_LOG": str(root / "steps.json")}
    proc, url, _ = start_app(root, "--queue-size", str(QUEUE_SIZE), "--max-active", "1", env=env, faults=True)
    yield url, root
    stop_app(proc)


def _wait(condition, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_request_beyond_the_queue_size_is_refused_and_the_others_are_served(small_queue):
    from gradio_client.utils import Status

    url, root = small_queue
    steps = root / "steps.json"

    def computing(rows: int) -> bool:
        try:
            return json.loads(steps.read_text()).get(str(rows), [0])[0] > 0
        except (OSError, ValueError):
            return False

    clients = [gradio_client.Client(url, verbose=False) for _ in range(QUEUE_SIZE + 2)]
    running = clients[0].submit("a blue square", 4, 1.0, 16, 1.0, 100, api_name="/text_to_image")
    _wait(lambda: computing(4), "the first request to compute")
    waiting = []
    for i, client in enumerate(clients[1:QUEUE_SIZE + 1]):
        job = client.submit("a red circle", 1, 1.0, 16, 1.0, 200 + i, api_name="/text_to_image")
        _wait(lambda: job.status().code == Status.IN_QUEUE, f"request {i + 2} to wait in the queue")
        waiting.append(job)
    start = time.perf_counter()
    extra = clients[-1].submit("a green triangle", 2, 1.0, 16, 1.0, 300, api_name="/text_to_image")
    with pytest.raises(Exception) as info:
        extra.result(timeout=30)
    refused_s = time.perf_counter() - start
    assert not running.done() and all(job.status().code == Status.IN_QUEUE for job in waiting)  # refused at once
    message = str(info.value).strip()
    assert "queue is full" in message.lower() and "try again" in message.lower(), message
    assert message.count("\n") == 0 and "Traceback" not in message, message
    files, result = running.result(timeout=60)
    assert result["seeds"] == [100, 101, 102, 103] and len(files) == 4
    for i, job in enumerate(waiting):
        files, result = job.result(timeout=60)
        assert result["seeds"] == [200 + i] and read_parameters(_paths(files)[0])["seed"] == 200 + i
    assert extra.outputs() == []  # the refused request never ran
    assert json.loads(steps.read_text()).keys() == {"4", "1"}  # no 2-image step: the refused request never computed
    print(f"\n[queue] --queue-size {QUEUE_SIZE}, one request computing: request {QUEUE_SIZE + 2} refused in "
          f"{refused_s:.2f} s ('{message}'); the {QUEUE_SIZE + 1} others were served")
