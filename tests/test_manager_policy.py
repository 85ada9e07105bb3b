"""Public deployments: what visitors may load (DALLE_APP_HUB, DALLE_APP_ALLOWED_REPOS) and that their error messages
show the reference as given, never server paths outside the allowed model folders."""

import os
from pathlib import Path

import pytest

pytest.importorskip("youtokentome")

from dalle_app.manager import HubOptions, ModelLoadError, ModelManager
from dalle_app.manager.policy import VisitorPolicy, visitor_message
from dalle_app.service import Service

from app_factory import make_tiny_model
from hub_server import HubServer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    make_tiny_model(root / "model")
    return root


@pytest.fixture(scope="module")
def hub(root):
    with HubServer() as server:
        server.add_folder("owner/a", root / "model")
        server.add_folder("org/b", root / "model")
        yield server


def _manager(root, hub, tmp_path, policy=None, **hub_kwargs):
    return ModelManager(device="cpu", dtype="fp32", allowed_roots=[root], visitor_policy=policy,
                        hub_options=HubOptions(endpoint=hub.url, cache_dir=tmp_path / "hub_cache", **hub_kwargs))


def _refusal(load) -> str:
    with pytest.raises(ModelLoadError) as info:
        load()
    text = str(info.value)
    assert "\n" not in text and text.endswith("."), text
    return text


def test_policy_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("DALLE_APP_HUB", raising=False)
    monkeypatch.delenv("DALLE_APP_ALLOWED_REPOS", raising=False)
    assert VisitorPolicy.from_env() == VisitorPolicy(hub=True, allowed_repos=None)  # permissive by default
    monkeypatch.setenv("DALLE_APP_HUB", "OFF")
    monkeypatch.setenv("DALLE_APP_ALLOWED_REPOS", " owner/a, org/* ,")
    assert VisitorPolicy.from_env() == VisitorPolicy(hub=False, allowed_repos=("owner/a", "org/*"))
    monkeypatch.setenv("DALLE_APP_HUB", "maybe")
    with pytest.raises(ValueError, match="DALLE_APP_HUB must be on or off"):
        VisitorPolicy.from_env()
    monkeypatch.setenv("DALLE_APP_HUB", "on")
    monkeypatch.setenv("DALLE_APP_ALLOWED_REPOS", "owner/a,just-a-name")
    with pytest.raises(ValueError, match="'just-a-name', which is not a Hub repository"):
        VisitorPolicy.from_env()


def test_hub_off_refuses_visitors_hub_references_before_any_download(root, hub, tmp_path):
    manager = _manager(root, hub, tmp_path, VisitorPolicy(hub=False))
    seen = len(hub.requests)
    for reference in ("owner/a", "hf://owner/a@main", "owner/a:config.json"):
        text = _refusal(lambda: manager.load(reference, visitor=True))
        assert "Hub is turned off on this server" in text and f"'{reference}'" in text and "local model" in text
    assert len(hub.requests) == seen  # nothing was asked of the Hub
    assert manager.load(str(root / "model"), visitor=True).image_size == 32  # local models still load
    assert manager.load("owner/a").reference == "owner/a"  # the operator's own references are not restricted


def test_allowed_repos_let_visitors_load_only_those(root, hub, tmp_path):
    manager = _manager(root, hub, tmp_path, VisitorPolicy(allowed_repos=("owner/a", "org/*")))
    assert manager.load("owner/a", visitor=True).reference == "owner/a"
    # repository ids compare case-insensitively: the policy lets it through (the Hub imitation, unlike the Hub,
    # knows only the exact spelling)
    assert "not among" not in _refusal(lambda: manager.load("Owner/A@main", visitor=True))
    assert manager.load("org/b", visitor=True).reference == "org/b"  # by pattern
    seen = len(hub.requests)
    text = _refusal(lambda: manager.load("other/c", visitor=True))
    assert "'other/c' is not among the models this server allows (owner/a, org/*)" in text
    assert len(hub.requests) == seen
    assert manager.load(str(root / "model"), visitor=True).image_size == 32


def test_the_service_applies_the_environment_policy_to_requests(root, monkeypatch):
    monkeypatch.setenv("DALLE_APP_HUB", "off")
    manager = ModelManager(device="cpu", dtype="fp32", allowed_roots=[root])
    service = Service(str(root / "model"), manager=manager, output_dir=root / "out")
    text = _refusal(lambda: service.load("owner/a"))
    assert "turned off" in text
    with pytest.raises(ModelLoadError, match="turned off"):
        list(service.text_to_image("a red circle", 1, seed=0, model="owner/a"))
    assert list(service.text_to_image("a red circle", 1, seed=0))[-1].done  # the default model is served


# ------------------------------------------------------------------------------------------ error messages

def test_visitors_errors_show_the_reference_as_given_not_server_paths(root, tmp_path, monkeypatch):
    manager = ModelManager(device="cpu", dtype="fp32", allowed_roots=[root])
    secret = tmp_path / "secret_place" / "models"
    secret.mkdir(parents=True)
    link = root / "innocent"
    if not link.exists():
        link.symlink_to(secret)
    text = _refusal(lambda: manager.load(str(link), visitor=True))  # inside the root, pointing outside
    assert str(link) in text and "secret_place" not in text and "outside the allowed model folders" in text
    monkeypatch.chdir(root)
    relative = os.path.relpath(secret, root)  # ../.../secret_place/models
    text = _refusal(lambda: manager.load(relative, visitor=True))
    assert relative in text and str(secret) not in text
    text = _refusal(lambda: manager.load("./missing_model", visitor=True))
    assert "./missing_model" in text and str(root) not in text
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "dalle.pt").write_bytes(b"\0garbage" * 10)
    text = _refusal(lambda: manager.load("broken", visitor=True))
    assert "dalle.pt" in text and str(root) not in text


def test_hub_cache_folder_is_not_named(root, hub, tmp_path):
    manager = _manager(root, hub, tmp_path, offline=True)
    text = _refusal(lambda: manager.load("org/b", visitor=True))
    assert "Offline mode is on" in text and str(tmp_path) not in text and "hub_cache" not in text


def test_visitor_message_cuts_outside_paths_to_their_name(tmp_path):
    inside = tmp_path / "models" / "m" / "config.json"
    message = (f"{inside} and /srv/hf/hub/models--o--n/snapshots/abc/tokenizer.json are broken; see "
               "http://127.0.0.1:7860/x, o/n@refs/pr/3 and /etc/.")
    shown = visitor_message(message, "o/n", None, [tmp_path / "models"])
    assert shown == (f"{inside} and tokenizer.json are broken; see http://127.0.0.1:7860/x, o/n@refs/pr/3 and "
                     "etc.")
