"""Load through the running app: 16 gradio_client clients at once, isolation of seeds/prompts between them, and
the server's memory over ~100 requests. Figures are printed (run with -s) for the README."""

from __future__ import annotations

import statistics
import threading
import time

import pytest

pytest.importorskip("youtokentome")
gradio_client = pytest.importorskip("gradio_client")

from dalle_app.service import read_parameters

from reliability_server import start_app, stop_app

CLIENTS = 16
BOUND_S = 120  # every one of the 16 requests answered within this (tiny model, 2 shared CPU cores)
SEQUENTIAL = 100
RSS_BOUND_MB = 150


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


def test_memory_does_not_grow_over_a_hundred_requests(server):
    url, proc = server
    client = gradio_client.Client(url, verbose=False)
    for i in range(10):  # warm-up: caches, first compilations, Gradio's upload folders
        client.predict("a red circle", 1, 1.0, 16, 1.0, i, api_name="/text_to_image")
    before = _rss_mb(proc.pid)
    latencies, samples = [], []
    for i in range(SEQUENTIAL):
        start = time.perf_counter()
        if i % 2:
            client.predict("a blue square", 1, 1.0, 16, 1.0, i, api_name="/text_to_image")
        else:
            client.predict("a red", 1, 1.0, 16, i, api_name="/complete_text")
        latencies.append(time.perf_counter() - start)
        if i % 25 == 24:
            samples.append(round(_rss_mb(proc.pid), 1))
    after = _rss_mb(proc.pid)
    growth = after - before
    print(f"\n[memory] {SEQUENTIAL} sequential requests: latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p95 {_percentile(latencies, 0.95) * 1000:.0f} ms; server RSS {before:.1f} MB -> {after:.1f} MB "
          f"(growth {growth:+.1f} MB; every 25 requests: {samples})")
    assert growth < RSS_BOUND_MB, f"server RSS grew {growth:.1f} MB over {SEQUENTIAL} requests"
