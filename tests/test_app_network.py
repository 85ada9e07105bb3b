"""The app reaches no other machine: started with Hub offline mode, analytics and telemetry settings all unset (so
app.py's own defaults are what is tested), it makes no outbound connection or name lookup at start-up, while
serving API requests on a local model, or while a browser uses its page, and the page loads nothing from elsewhere.

The app runs under tests/network_guard.py, which records and refuses any non-loopback connection; the first test
shows that the guard does catch one."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("youtokentome")
gradio_client = pytest.importorskip("gradio_client")

from browser_helpers import browser, fill, open_page, wait_images  # noqa: F401
from reliability_server import start_app, stop_app

ROOT = Path(__file__).resolve().parents[1]
GUARD = ROOT / "tests" / "network_guard.py"
UNSET = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY",
         "DO_NOT_TRACK", "HF_HUB_DISABLE_IMPLICIT_TOKEN")


def _entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_the_guard_records_and_refuses_a_connection_to_another_machine(tmp_path):
    log = tmp_path / "net.log"
    script = tmp_path / "connect.py"
    script.write_text("""
import socket
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
socket.create_connection(server.getsockname(), timeout=1).close()        # loopback: allowed
for address in [("192.0.2.1", 80), ("2001:db8::1", 443)]:              # documentation ranges, refused anyway
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    try:
        socket.socket(family).connect(address)
    except OSError as exc:
        print("refused", address[0], exc.errno)
try:
    socket.getaddrinfo("example.com", 443)
except socket.gaierror:
    print("refused example.com")
""")
    out = subprocess.run([sys.executable, str(GUARD), str(log), str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["refused 192.0.2.1 101", "refused 2001:db8::1 101", "refused example.com"]
    entries = _entries(log)
    assert entries[0] == {"guard": "installed"}
    assert [(e["call"], e["address"]) for e in entries[1:]] == [
        ("connect", "('192.0.2.1', 80)"), ("connect", "('2001:db8::1', 443)"), ("getaddrinfo", "'example.com'")]


def test_the_guard_catches_the_apps_own_hub_request(tmp_path):
    """Through the app's real network stack (huggingface_hub on its loading thread): a Hub model is asked for."""
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    out = subprocess.run([sys.executable, str(GUARD), str(log), "app.py", "--model", "hf://someone/some-model",
                          "--device", "cpu"], cwd=ROOT, env={**env, "HF_HOME": str(tmp_path / "hf")},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("error: Cannot reach the Hub"), out.stderr[-2000:]
    assert {"call": "getaddrinfo", "address": "'huggingface.co'"} in _entries(log)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline-app")
    log = root / "net.log"
    proc, url, folder = start_app(root, program=[str(GUARD), str(log), "app.py"], unset=UNSET)
    yield url, log, folder
    stop_app(proc)


def test_no_outbound_connection_at_start_up_or_while_serving_requests(guarded):
    url, log, folder = guarded
    assert b"gradio" in urllib.request.urlopen(url, timeout=30).read().lower()  # the page itself
    client = gradio_client.Client(url, verbose=False)
    files, info = client.predict("a red circle", 2, 1.0, 16, 1.0, 3, api_name="/text_to_image")
    assert info["seeds"] == [3, 4] and info["model"] == str(folder)
    text, _ = client.predict("a red", 1, 1.0, 16, 0, api_name="/complete_text")
    assert text.startswith("a red")
    assert _entries(log) == [{"guard": "installed"}]  # the guard ran in the app, and nothing was refused


def test_the_page_loads_nothing_from_elsewhere_and_the_app_stays_offline(guarded, browser):
    url, log, _ = guarded
    elsewhere = []
    page = browser.new_page()
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else elsewhere.append(r.url))
    page.goto(url)
    fill(page.get_by_label("Prompt", exact=True), "a blue square")
    page.locator("#generate").click()
    wait_images(page, "#gallery", 4, "#info")
    page.close()
    assert elsewhere == []
    assert _entries(log) == [{"guard": "installed"}]
