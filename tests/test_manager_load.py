"""End to end: references -> placed networks that reproduce DALLE-pytorch's logits; Hub, cache, info CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

try:
    from dalle_app.models import DALLE  # noqa: F401
except ImportError:  # the networks are written in parallel; these tests run once they exist
    pytest.skip("dalle_app.models.DALLE is not available yet", allow_module_level=True)

from dalle_app.manager import HubOptions, ModelLoadError, ModelManager, convert_checkpoint, save_pretrained

import manager_factory as mf
from hub_server import HubServer
from test_manager_pretrained import make_tokenizer_json

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "reference"


def _manager(tmp_path, **kw):
    return ModelManager(device="cpu", dtype="fp32", memory_budget="1GB", allowed_roots=[ROOT, tmp_path], **kw)


def _reference_checkpoints():
    manifest = REFERENCE / "manifest.json"
    if not manifest.is_file():
        return []
    return [c for c in json.loads(manifest.read_text()).get("checkpoints", []) if "kwargs_1.6.6" in c]


@pytest.fixture
def tokenizer100(tmp_path):
    return str(make_tokenizer_json(tmp_path / "tokenizer.json", 100))


@pytest.mark.parametrize("entry", _reference_checkpoints(), ids=lambda c: c["name"])
def test_old_release_checkpoints_reproduce_their_logits(entry, tmp_path, tokenizer100):
    """Each file written by an old release loads and gives the logits that release computed."""
    model = _manager(tmp_path).load(str(REFERENCE / entry["file"]), tokenizer=tokenizer100)
    expected = load_file(str(REFERENCE / entry["expected"]))
    with torch.no_grad():
        logits = model.dalle(expected["in/text"], expected["in/image_ids"])
    torch.testing.assert_close(logits, expected["out/logits_native"], atol=1e-4, rtol=1e-4)
    assert model.tokenizer.vocab_size == 100 and model.device == torch.device("cpu")
    assert model.image_tokens == expected["in/image_ids"].shape[1]


def test_info_fields_and_project_format_roundtrip(tmp_path, tokenizer100):
    src = REFERENCE / "checkpoints" / "dalle_v1.4.2_shared_fp16.pt"
    if not src.is_file():
        pytest.skip("reference fixtures not generated")
    manager = _manager(tmp_path)
    model = manager.load(str(src), tokenizer=tokenizer100)
    info = model.info()
    assert info["hparams"]["share_input_output_emb"] is True and info["vae"]["kind"] == "DiscreteVAE"
    assert info["image"] == {"size": 16, "fmap_size": 4, "tokens": 16}
    assert info["tokenizer"]["kind"] == "hf" and info["tokenizer"]["vocab_size"] == 100
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["parameters"]["total"] == sum(p.numel() for p in model.dalle.parameters())
    assert info["files"][0]["filename"] == src.name and info["source"]["dalle_pytorch_version"] == "1.4.2"
    json.dumps(info)  # JSON-ready

    out = save_pretrained(tmp_path / "saved", model=model)
    again = manager.load(str(out))
    assert again.config["tokenizer"]["kind"] == "hf" and again.tokenizer.vocab_size == 100
    expected = load_file(str(REFERENCE / "checkpoints" / "dalle_v1.4.2_shared_fp16.expected.safetensors"))
    with torch.no_grad():
        a = model.dalle(expected["in/text"], expected["in/image_ids"])
        b = again.dalle(expected["in/text"], expected["in/image_ids"])
    assert torch.equal(a, b)


def test_wrong_vae_is_one_sentence(tmp_path, tokenizer100):
    folder = tmp_path / "m"
    folder.mkdir()
    no_vae = {k: v for k, v in mf.dalle_state_dict().items() if not k.startswith("vae.")}
    torch.save(mf.train_dalle_dict(no_vae, vae_params=None, vae_class_name=None), folder / "dalle.pt")
    other = dict(mf.VAE_PARAMS, num_tokens=128)
    torch.save({"hparams": other, "weights": mf.discrete_vae_state_dict(other)}, tmp_path / "vae.pt")
    with pytest.raises(ModelLoadError, match="image_emb.weight has 64 rows but the VAE .* has 128 codes") as err:
        _manager(tmp_path).load(str(folder), vae=str(tmp_path / "vae.pt"), tokenizer="hf=" + tokenizer100)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="holds no VAE weights"):
        _manager(tmp_path).load(str(folder / "dalle.pt"))


@pytest.fixture
def hub():
    server = HubServer().start()
    yield server
    server.stop()


def test_hub_model_loads_then_loads_from_cache_and_info_cli(hub, tmp_path):
    ckpt = tmp_path / "dalle.pt"
    torch.save(mf.train_dalle_dict(mf.dalle_state_dict()), ckpt)
    make_tokenizer_json(tmp_path / "tokenizer.json", 50)
    repo = convert_checkpoint(ckpt, tmp_path / "repo", tokenizer_file=tmp_path / "tokenizer.json")
    commit = hub.add_folder("owner/tiny-dalle", repo)
    opts = HubOptions(endpoint=hub.url, cache_dir=tmp_path / "hfhome" / "hub")
    model = _manager(tmp_path, hub_options=opts).load("owner/tiny-dalle")
    assert {f.commit for f in model.files} == {commit}
    text = torch.randint(1, 50, (1, 8))
    with torch.no_grad():
        logits = model.dalle(text, torch.randint(0, 64, (1, 64)))
    assert logits.shape == (1, 8 + 64, 50 + 8 + 64)

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hfhome"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": str(ROOT), "DALLE_APP_DEVICE": "cpu"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    hub.stop()  # second start: no network, everything from the cache
    out = subprocess.run([sys.executable, "-m", "dalle_app", "info", "--model", "owner/tiny-dalle"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["reference"] == "owner/tiny-dalle" and info["dtype"] == "float32"
    assert info["image"]["tokens"] == 64 and info["tokenizer"]["kind"] == "hf"
    assert {f["commit"] for f in info["files"]} == {commit} and all(f["repo_id"] == "owner/tiny-dalle" for f in info["files"])
    out = subprocess.run([sys.executable, "-m", "dalle_app", "info", "--model", "owner/not-cached"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
