"""Hub downloads through the real huggingface_hub client, against the Hub imitation in hub_server.py."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dalle_app.manager import HubOptions, ModelLoadError, hub_download, hub_list_files

from hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub():
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub sleeps between retries (1 s per resume, up to 23 s when the server is down); skip the waits."""
    import huggingface_hub.file_download as fd
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(fd.time, "sleep", lambda seconds: None)
    assert http.time is fd.time  # the same module object, patched once


def _options(hub, tmp_path, **kw):
    return HubOptions(endpoint=hub.url, cache_dir=tmp_path / "cache", **kw)


def _resolve_gets(hub):
    return [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]


def test_download_then_cache_hit_with_server_stopped(hub, tmp_path):
    commit = hub.add_commit("owner/model", {"dalle.pt": b"weights" * 1000, "sub/tokenizer.json": b"{}"})
    opts = _options(hub, tmp_path)
    got = hub_download("owner/model", "sub/tokenizer.json", options=opts)
    assert got.commit == commit and got.revision == "main" and got.local_path.read_bytes() == b"{}"
    assert str(got.local_path).startswith(str(tmp_path / "cache"))
    assert hub_list_files("owner/model", options=opts) == (commit, ["dalle.pt", "sub/tokenizer.json"])
    hub.stop()
    start = time.monotonic()
    again = hub_download("owner/model", "sub/tokenizer.json", options=opts)
    assert again.local_path == got.local_path and again.commit == commit
    # the listing falls back to what is cached: only the file downloaded so far
    assert hub_list_files("owner/model", options=opts) == (commit, ["sub/tokenizer.json"])
    assert time.monotonic() - start < 5


def test_revisions_branch_tag_commit(hub, tmp_path):
    first = hub.add_commit("owner/model", {"config.json": b"1"}, tags=("v1",))
    second = hub.add_commit("owner/model", {"config.json": b"2"})
    hub.add_commit("owner/model", {"config.json": b"3"}, branch="dev")
    opts = _options(hub, tmp_path)
    for revision, content, commit in (("v1", b"1", first), (None, b"2", second), (first, b"1", first)):
        got = hub_download("owner/model", "config.json", revision, opts)
        assert got.local_path.read_bytes() == content and got.commit == commit
    assert hub_download("owner/model", "config.json", "dev", opts).local_path.read_bytes() == b"3"
    assert hub_list_files("owner/model", "v1", opts)[0] == first


def test_offline_mode(hub, tmp_path):
    hub.add_commit("owner/model", {"a.json": b"a", "b.json": b"b"})
    hub_download("owner/model", "a.json", options=_options(hub, tmp_path))
    seen = len(hub.requests)
    offline = _options(hub, tmp_path, offline=True)
    assert hub_download("owner/model", "a.json", options=offline).local_path.read_bytes() == b"a"
    assert hub_list_files("owner/model", options=offline)[1] == ["a.json"]
    with pytest.raises(ModelLoadError, match="Offline mode is on .*'b.json'.*not in the Hub cache"):
        hub_download("owner/model", "b.json", options=offline)
    with pytest.raises(ModelLoadError, match="Offline mode"):
        hub_list_files("owner/other", options=offline)
    assert len(hub.requests) == seen  # offline means no request at all


@pytest.mark.parametrize("repo, filename, revision, phrase", [
    ("owner/missing", "dalle.pt", None, "repository 'owner/missing' was not found"),
    ("owner/model", "nope.pt", None, "file 'nope.pt' does not exist"),
    ("owner/model", "dalle.pt", "v9", "revision 'v9' does not exist"),
])
def test_404_errors_are_one_sentence(hub, tmp_path, repo, filename, revision, phrase):
    hub.add_commit("owner/model", {"dalle.pt": b"x"})
    with pytest.raises(ModelLoadError) as err:
        hub_download(repo, filename, revision, _options(hub, tmp_path))
    assert phrase in str(err.value) and "\n" not in str(err.value)


def test_404_on_listing(hub, tmp_path):
    hub.add_commit("owner/model", {"dalle.pt": b"x"})
    with pytest.raises(ModelLoadError, match="was not found"):
        hub_list_files("owner/missing", options=_options(hub, tmp_path))
    with pytest.raises(ModelLoadError, match="revision 'nope' does not exist"):
        hub_list_files("owner/model", "nope", _options(hub, tmp_path))


def test_private_repo_needs_token(hub, tmp_path):
    hub.add_commit("owner/private", {"dalle.pt": b"secret"}, private_token="hf_test_token")
    with pytest.raises(ModelLoadError, match="HF_TOKEN"):
        hub_download("owner/private", "dalle.pt", options=_options(hub, tmp_path, token=False))
    got = hub_download("owner/private", "dalle.pt", options=_options(hub, tmp_path, token="hf_test_token"))
    assert got.local_path.read_bytes() == b"secret"


def test_interrupted_download_is_resumed_by_the_client(hub, tmp_path, no_backoff):
    data = os.urandom(200_000)
    hub.add_commit("owner/model", {"dalle.pt": data})
    hub.interrupt("dalle.pt", times=1)
    got = hub_download("owner/model", "dalle.pt", options=_options(hub, tmp_path))
    assert got.local_path.read_bytes() == data
    assert len(_resolve_gets(hub)) == 2  # the cut transfer and the retry


def test_failed_download_leaves_no_broken_file_and_retry_succeeds(hub, tmp_path, no_backoff):
    data = os.urandom(200_000)
    hub.add_commit("owner/model", {"dalle.pt": data})
    hub.interrupt("dalle.pt", times=100)  # every attempt is cut: the client gives up
    opts = _options(hub, tmp_path)
    with pytest.raises(ModelLoadError, match="interrupted.*run the same request again") as err:
        hub_download("owner/model", "dalle.pt", options=opts)
    assert "\n" not in str(err.value)
    storage = tmp_path / "cache" / "models--owner--model"
    leftovers = [p for p in storage.rglob("*") if p.is_file() and p.parent.name != "refs"]
    assert leftovers == [], leftovers  # no partial blob, no snapshot pointer
    with pytest.raises(ModelLoadError, match="Offline mode"):  # nothing usable was cached
        hub_download("owner/model", "dalle.pt", options=_options(hub, tmp_path, offline=True))
    hub.interrupt("dalle.pt", times=0)
    assert hub_download("owner/model", "dalle.pt", options=opts).local_path.read_bytes() == data


def test_no_network_and_nothing_cached(hub, tmp_path, no_backoff):
    hub.add_commit("owner/model", {"dalle.pt": b"x"})
    opts = _options(hub, tmp_path)
    hub.stop()
    with pytest.raises(ModelLoadError, match="Cannot reach the Hub at .*not in the Hub cache"):
        hub_download("owner/model", "dalle.pt", options=opts)
    with pytest.raises(ModelLoadError, match="Cannot reach the Hub"):
        hub_list_files("owner/model", options=opts)


def test_imitation_serves_ranges(hub):
    hub.add_commit("owner/model", {"f.bin": bytes(range(100))})
    request = urllib.request.Request(f"{hub.url}/owner/model/resolve/main/f.bin", headers={"Range": "bytes=90-"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206 and response.read() == bytes(range(90, 100))
        assert response.headers["Content-Range"] == "bytes 90-99/100"


def test_environment_variables_work_as_users_expect(hub, tmp_path):
    """HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE, read by huggingface_hub at import (so: a subprocess)."""
    commit = hub.add_commit("owner/private", {"dalle.pt": b"env"}, private_token="hf_env_token")
    script = ("from dalle_app.manager import hub_download; "
              "f = hub_download('owner/private', 'dalle.pt'); print(f.local_path, f.commit)")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hfhome"), "HF_TOKEN": "hf_env_token",
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, got_commit = out.stdout.split()
    assert path.startswith(str(tmp_path / "hfhome" / "hub")) and got_commit == commit
    seen = len(hub.requests)
    out = subprocess.run([sys.executable, "-c", script], env={**env, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == path and len(hub.requests) == seen
