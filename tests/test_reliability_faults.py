"""Faults through the running app: fair turns between clients, clients that go away, out-of-memory, a Hub download
cut halfway. The app runs through tests/reliability_launcher.py, which slows each decoding step down (sleeping, so
the shared CPU is not used), simulates CUDA out-of-memory on demand and logs the steps it runs. Figures are printed
(run with -s) for the README."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Callable

import pytest

pytest.importorskip("youtokentome")
gradio_client = pytest.importorskip("gradio_client")
from PIL import Image

from hub_server import HubServer
from reliability_server import start_app, stop_app

STEP_DELAY = 0.004  # seconds per image per decoding step: 16 images take ~4 s, one image ~0.25 s
BIG = 16


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory, hub):
    root = tmp_path_factory.mktemp("reliability_faults")
    env = {"DALLE_TEST_STEP_DELAY": str(STEP_DELAY), "DALLE_TEST_OOM_FILE": str(root / "oom_rows"),
           "DALLE_TEST_STEP_LOG": str(root / "steps.json"), "DALLE_TEST_NO_HF_BACKOFF": "1",
           "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(root / "hub_cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc, url, folder = start_app(root, env=env, faults=True)
    yield url, root, folder
    stop_app(proc)


@pytest.fixture(scope="module")
def local(server):
    """The same model in this process, without faults: the reference for the app's images."""
    from dalle_app.manager import ModelManager
    from dalle_app.service import Service

    _, root, folder = server
    manager = ModelManager(device="cpu", dtype="fp32", allowed_roots=[root])
    return Service(str(folder), manager=manager, output_dir=root / "local_out")


def _steps(root: Path) -> dict[int, list]:
    """{images in the step: [steps run, time of the last one]} as the launcher logged it."""
    try:
        return {int(k): v for k, v in json.loads((root / "steps.json").read_text()).items()}
    except (OSError, ValueError):
        return {}


def _wait_for_steps(root: Path, rows: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while _steps(root).get(rows, [0])[0] == 0:
        assert time.time() < deadline, f"no step with {rows} images started"
        time.sleep(0.02)


def _wait_idle(root: Path, quiet: float = 0.5, timeout: float = 60) -> None:
    """Wait until no decoding step has run for `quiet` seconds (an earlier test's request may still be running)."""
    deadline = time.time() + timeout
    while any(time.time() - last < quiet for _, last in _steps(root).values()):
        assert time.time() < deadline, "the app never went idle"
        time.sleep(0.05)


def _paths(files):
    return [f["image"] if isinstance(f, dict) else f for f in files]


def _same_images(app_files, local_update) -> bool:
    ours = [list(Image.open(p).getdata()) for p in _paths(app_files)]
    theirs = [list(Image.open(p).getdata()) for p in local_update.files]
    return ours == theirs


def _last(updates):
    return list(updates)[-1]


def _one_sentence(exc) -> str:
    text = str(exc).strip()
    assert text and "Traceback" not in text and "\n" not in text and len(text) < 400, text
    return text


def test_small_request_is_served_beside_a_large_one_with_unchanged_images(server, local):
    url, root, _ = server
    big_client, small_client = (gradio_client.Client(url, verbose=False) for _ in range(2))
    start = time.perf_counter()
    job = big_client.submit("a blue square", BIG, 1.0, 16, 1.0, 100, api_name="/text_to_image")
    _wait_for_steps(root, BIG)
    small_start = time.perf_counter()
    small_files, small_info = small_client.predict("a red circle", 1, 1.0, 16, 1.0, 7, api_name="/text_to_image")
    small_s = time.perf_counter() - small_start
    big_files, big_info = job.result(timeout=120)
    big_s = time.perf_counter() - start
    alone_start = time.perf_counter()
    small_client.predict("a red circle", 1, 1.0, 16, 1.0, 8, api_name="/text_to_image")
    alone_s = time.perf_counter() - alone_start
    print(f"\n[fairness] {BIG} images took {big_s:.2f} s; 1 image sent while they were computing answered in "
          f"{small_s:.2f} s (alone {alone_s:.2f} s)")
    assert small_s < 0.5 * big_s, (small_s, big_s)
    assert big_info["seeds"] == list(range(100, 100 + BIG)) and small_info["seeds"] == [7]
    assert _same_images(big_files, _last(local.text_to_image("a blue square", BIG, 1.0, 16, 1.0, 100)))
    assert _same_images(small_files, _last(local.text_to_image("a red circle", 1, 1.0, 16, 1.0, 7)))


def _cancel_frees_the_slot(server, stop_client) -> tuple[float, float, float]:
    """Start a big request, stop it with `stop_client(job, client)`, send a small one at once.

    Returns (seconds until the big request's last step, small request's latency, its latency alone)."""
    url, root, _ = server
    client, other = (gradio_client.Client(url, verbose=False) for _ in range(2))
    _wait_idle(root)
    before = _steps(root).get(BIG, [0])[0]
    job = client.submit("a green triangle", BIG, 1.0, 16, 1.0, 300, api_name="/text_to_image")
    deadline = time.time() + 30
    while _steps(root).get(BIG, [0])[0] <= before + 2:
        assert time.time() < deadline, "the big request never started"
        time.sleep(0.02)
    stopped_at = time.time()
    stop_client(job, client)
    small_start = time.perf_counter()
    files, info = other.predict("a red circle", 1, 1.0, 16, 1.0, 9, api_name="/text_to_image")
    small_s = time.perf_counter() - small_start
    time.sleep(1.0)
    count, last = _steps(root)[BIG]
    time.sleep(0.5)
    assert _steps(root)[BIG][0] == count, "the big request kept computing after its client went away"
    assert info["seeds"] == [9] and len(files) == 1
    alone_start = time.perf_counter()
    other.predict("a red circle", 1, 1.0, 16, 1.0, 10, api_name="/text_to_image")
    return max(0.0, last - stopped_at), small_s, time.perf_counter() - alone_start


def test_cancel_frees_the_slot_at_once(server):
    """gradio_client's Job.cancel() stops a request only because its endpoint is a generator (Gradio closes it after
    its next yield; a plain function would run to its end)."""
    freed, small_s, alone_s = _cancel_frees_the_slot(server, lambda job, client: job.cancel())
    print(f"\n[cancel] Job.cancel(): the {BIG}-image request's last step ran {freed:.2f} s after the cancel; the next "
          f"client's 1 image answered in {small_s:.2f} s (alone {alone_s:.2f} s)")
    assert freed < 1.0 and small_s < alone_s + 1.5


def _browser_event(url: str, labels_needed: set, values: dict, generator: bool | None = None):
    """Join the queue as a browser tab does for the event whose inputs carry `labels_needed`; return the open
    event stream (an httpx response to iterate with iter_lines; close it to go away).

    values: input values by the inputs' labels (a gr.State input is sent as null, as the browser does)."""
    import httpx

    config = httpx.get(url + "config", timeout=10).json()
    labels = {c["id"]: c.get("props", {}).get("label") for c in config["components"]}
    event = next(d for d in config["dependencies"] if labels_needed <= {labels.get(i) for i in d["inputs"]}
                 and (generator is None or bool((d.get("types") or {}).get("generator")) == generator))
    data = [values.get(labels.get(i)) for i in event["inputs"]]
    prefix = url + config.get("api_prefix", "/gradio_api").strip("/") + "/"
    session = uuid.uuid4().hex[:10]
    joined = httpx.post(prefix + "queue/join", json={"data": data, "fn_index": event["id"], "session_hash": session,
                                                      "event_data": None, "trigger_id": None}, timeout=10)
    joined.raise_for_status()
    client = httpx.Client(timeout=60)
    return client.send(client.build_request("GET", prefix + "queue/data", params={"session_hash": session}),
                       stream=True)


def _browser_result(stream) -> dict:
    """Read a browser-like event stream to its process_completed message."""
    with closing(stream):
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event stream ended without a result")


def _submit_then_disconnect(url: str, values: dict, started: Callable[[], bool]) -> None:
    """Click Generate as a browser tab does and close the connection once `started()` is true."""
    stream = _browser_event(url, {"Prompt", "CLIP rerank"}, values, generator=True)
    with closing(stream):
        for _ in stream.iter_lines():
            if started():
                return  # leaving the block closes the connection


def test_closed_browser_connection_frees_the_slot_at_once(server):
    url, root, _ = server
    _wait_idle(root)
    before = _steps(root).get(BIG, [0])[0]
    values = {"Prompt": "a green triangle", "Number of images": BIG, "Temperature": 1.0, "Top-k (0 = all)": 16,
              "Top-p (1 = off)": 1.0, "Guidance scale (1 = off)": 1.0, "Seed (-1 = random)": 500,
              "CLIP rerank": False, "Keep best M": 1}
    closer = threading.Thread(target=_submit_then_disconnect, args=(
        url, values, lambda: _steps(root).get(BIG, [0])[0] > before + 2))
    closer.start()
    closer.join(60)
    assert _steps(root).get(BIG, [0])[0] > before, "the request never started"
    stopped_at = time.time()
    other = gradio_client.Client(url, verbose=False)
    small_start = time.perf_counter()
    files, info = other.predict("a red circle", 1, 1.0, 16, 1.0, 11, api_name="/text_to_image")
    small_s = time.perf_counter() - small_start
    time.sleep(1.0)
    count, last = _steps(root)[BIG]
    time.sleep(0.5)
    assert _steps(root)[BIG][0] == count, "the big request kept computing after its client went away"
    freed = max(0.0, last - stopped_at)
    alone_start = time.perf_counter()
    other.predict("a red circle", 1, 1.0, 16, 1.0, 12, api_name="/text_to_image")
    alone_s = time.perf_counter() - alone_start
    print(f"\n[disconnect] browser-like client closed its connection: the {BIG}-image request's last step ran "
          f"{freed:.2f} s after; the next client's 1 image answered in {small_s:.2f} s (alone {alone_s:.2f} s)")
    assert freed < 1.0 and small_s < alone_s + 1.5


def test_out_of_memory_is_retried_smaller_or_refused_and_the_next_request_works(server, local):
    url, root, _ = server
    client = gradio_client.Client(url, verbose=False)
    limit = root / "oom_rows"
    try:
        limit.write_text("2")  # batches of more than 2 images "do not fit"
        files, info = client.predict("a red circle", 4, 1.0, 16, 1.0, 40, api_name="/text_to_image")
        assert any("retried in chunks of 2" in note for note in info["notes"]), info["notes"]
        assert info["seeds"] == [40, 41, 42, 43]
        assert _same_images(files, _last(local.text_to_image("a red circle", 4, 1.0, 16, 1.0, 40)))
        limit.write_text("0")  # not even one image fits
        with pytest.raises(Exception) as err:
            client.predict("a red circle", 2, 1.0, 16, 1.0, 0, api_name="/text_to_image")
        text = _one_sentence(err.value)
        assert "out of memory" in text and "one image" in text, text
        print(f"\n[oom] 4 images with room for 2: answered in chunks of 2 (note: {info['notes'][-1]!r}); "
              f"no room at all: {text!r}")
    finally:
        limit.unlink(missing_ok=True)
    files, info = client.predict("a red circle", 2, 1.0, 16, 1.0, 1, api_name="/text_to_image")
    assert info["seeds"] == [1, 2] and len(files) == 2 and not any("memory" in n for n in info["notes"])


def test_download_cut_halfway_leaves_no_broken_file_and_the_next_attempt_succeeds(server, hub):
    url, root, folder = server
    hub.add_folder("tester/tiny-dalle", folder)
    weights = "model.safetensors"
    assert (folder / weights).exists()
    hub.interrupt(weights, times=100)  # every try is cut halfway: huggingface_hub gives up after its retries
    load = {"Catalog model": None, "Hub reference or local path": "tester/tiny-dalle"}
    start = time.perf_counter()
    failed = _browser_result(_browser_event(url, {"Hub reference or local path"}, load))
    failed_s = time.perf_counter() - start
    status = failed["output"]["data"][0]  # the panel's status line, beside the Load button
    assert "Not loaded" in status and not any(isinstance(v, dict) and "reference" in v
                                              for v in failed["output"]["data"]), failed  # no new card
    text = _one_sentence(re.sub(r"<[^>]+>", "", status))
    assert "interrupted" in text, text
    storage = root / "hub_cache" / "models--tester--tiny-dalle"
    cut = [r for r in hub.requests if r[0] == "GET" and r[1].endswith("/" + weights)]
    assert len(cut) >= 2  # the client tried, resumed, and gave up
    for blob in (storage / "blobs").glob("*") if (storage / "blobs").exists() else []:
        assert blob.name.endswith(".incomplete") or hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, \
            f"a broken blob was left as finished: {blob}"
    assert not list(storage.glob(f"snapshots/*/{weights}")), "the cut file is in a snapshot"
    hub.interrupt(weights, times=0)
    start = time.perf_counter()
    loaded = _browser_result(_browser_event(url, {"Hub reference or local path"}, load))
    ok_s = time.perf_counter() - start
    assert loaded.get("success"), loaded
    card = next(v for v in loaded["output"]["data"] if isinstance(v, dict) and "reference" in v)
    assert card["reference"].startswith("tester/tiny-dalle"), card
    data = (folder / weights).read_bytes()
    snapshot = next(storage.glob(f"snapshots/*/{weights}"))
    assert snapshot.read_bytes() == data
    print(f"\n[download] cut halfway on every try: refused after {failed_s:.1f} s with {text!r}; no finished "
          f"blob left broken; next attempt loaded the model in {ok_s:.1f} s")
