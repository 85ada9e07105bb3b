"""The project format, the converter CLI, finding a model's files (local and Hub) and choosing its tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dalle_app.__main__ import main as cli_main
from dalle_app.manager import HubOptions, ModelLoadError, read_checkpoint, read_pretrained, resolve, write_pretrained
from dalle_app.manager.pretrained import convert_checkpoint
from dalle_app.manager.tokenizer_choice import choose_tokenizer

import manager_factory as mf
from hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "reference" / "checkpoints"


def make_tokenizer_json(path: Path, vocab_size: int) -> Path:
    """A word-level Hugging Face tokenizer.json with exactly `vocab_size` tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))
    return path


def write_dalle_pt(folder: Path, name: str = "dalle.pt", **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(mf.train_dalle_dict(mf.dalle_state_dict(), **kw), folder / name)
    return folder / name


# ------------------------------------------------------------------------------------------ project format
def test_convert_roundtrip_keeps_every_tensor_and_shared_ones_once(tmp_path):
    src = REFERENCE / "dalle_v1.4.2_shared_fp16.pt"
    if not src.is_file():
        pytest.skip("reference fixtures not generated")
    make_tokenizer_json(tmp_path / "tokenizer.json", 100)
    out = convert_checkpoint(src, tmp_path / "out", tokenizer_file=tmp_path / "tokenizer.json")
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "dalle_app" and config["tokenizer"] == {"kind": "hf", "file": "tokenizer.json"}
    assert config["source"]["dalle_pytorch_version"] == "1.4.2" and config["conv_like_window"] == "centered"
    assert config["dalle"]["shared_attn_ids"] == ["0", "0"]
    stored = load_file(str(out / "model.safetensors"))
    assert "text_emb.linear.weight" not in stored and config["tied"]["model"]["text_emb.linear.weight"]
    original = read_checkpoint(src)
    _, again, _ = read_pretrained(out)
    assert set(again.state_dict) == set(original.state_dict)
    for key, value in original.state_dict.items():
        assert torch.equal(again.state_dict[key], value), key
    assert again.hparams == original.hparams and again.vae_params == original.vae_params
    assert again.conv_like_window == "centered"


def test_convert_cli_and_errors(tmp_path, capsys):
    ckpt = write_dalle_pt(tmp_path / "in")
    (tmp_path / "in" / "my.bpe").write_text("not used by the converter")
    assert cli_main(["convert", str(ckpt), str(tmp_path / "out"), "--bpe", str(tmp_path / "in" / "my.bpe")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tokenizer"] == {"kind": "yttm", "file": "my.bpe"} and (tmp_path / "out" / "my.bpe").is_file()
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert cli_main(["convert", str(tmp_path / "bad.pt"), str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: bad.pt is not a PyTorch checkpoint") and err.count("\n") == 1


def test_python_dash_m_entry_point(tmp_path):
    ckpt = write_dalle_pt(tmp_path / "in")
    out = subprocess.run([sys.executable, "-m", "dalle_app", "convert", str(ckpt), str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "vae.safetensors").is_file()


def test_newer_format_version_is_refused(tmp_path):
    ckpt = read_checkpoint(write_dalle_pt(tmp_path / "in"))
    folder = write_pretrained(tmp_path / "m", hparams=ckpt.hparams, dalle_weights=ckpt.dalle_weights(),
                              vae_kind="DiscreteVAE", vae_params=ckpt.vae_params, vae_weights=ckpt.vae_weights())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ModelLoadError, match="update dalle_app"):
        read_pretrained(folder)


# ------------------------------------------------------------------------------------------ finding files
def test_resolve_local_folder_with_tokenizer_and_hparams(tmp_path):
    folder = tmp_path / "model"
    sd = mf.dalle_state_dict()
    folder.mkdir()
    torch.save({"model." + k: v for k, v in sd.items()}, folder / "model_state.pt")
    torch.save({"state": 1}, folder / "optimizer_state.pt")  # must be ignored
    (folder / "hparams.json").write_text(json.dumps(dict(mf.HPARAMS, attn_types=list(mf.HPARAMS["attn_types"]))))
    make_tokenizer_json(folder / "tokenizer.json", 50)
    resolved = resolve(folder, allowed_roots=[tmp_path])
    assert resolved.checkpoint.hparams["shift_tokens"] is True and resolved.checkpoint.source_format == "state_dict"
    assert resolved.tokenizer_kind == "hf" and resolved.tokenizer_file == folder / "tokenizer.json"
    assert {r.filename for r in resolved.files} == {"model_state.pt", "hparams.json", "tokenizer.json"}


def test_resolve_asks_which_checkpoint(tmp_path):
    write_dalle_pt(tmp_path / "m", "epoch1.pt")
    write_dalle_pt(tmp_path / "m", "epoch2.pt")
    with pytest.raises(ModelLoadError, match=r"several checkpoints \(epoch1.pt, epoch2.pt\)"):
        resolve(tmp_path / "m", allowed_roots=[tmp_path])
    assert resolve(tmp_path / "m" / "epoch2.pt", allowed_roots=[tmp_path]).checkpoint.hparams["depth"] == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no model files"):
        resolve(tmp_path / "empty", allowed_roots=[tmp_path])


def test_resolve_separate_vae_next_to_a_dalle_without_one(tmp_path):
    folder = tmp_path / "m"
    no_vae = {k: v for k, v in mf.dalle_state_dict().items() if not k.startswith("vae.")}
    folder.mkdir()
    torch.save(mf.train_dalle_dict(no_vae, vae_params=None, vae_class_name=None), folder / "dalle.pt")
    torch.save({"hparams": mf.VAE_PARAMS, "weights": mf.discrete_vae_state_dict()}, folder / "vae-final.pt")
    resolved = resolve(folder, allowed_roots=[tmp_path])
    assert resolved.vae is not None and resolved.vae.kind == "DiscreteVAE" and resolved.vae.params == mf.VAE_PARAMS


@pytest.fixture
def hub():
    server = HubServer().start()
    yield server
    server.stop()


def test_resolve_hub_project_format_and_revision(hub, tmp_path):
    ckpt = read_checkpoint(write_dalle_pt(tmp_path / "in"))
    make_tokenizer_json(tmp_path / "tokenizer.json", 50)
    folder = write_pretrained(tmp_path / "repo", hparams=ckpt.hparams, dalle_weights=ckpt.dalle_weights(),
                              vae_kind="DiscreteVAE", vae_params=ckpt.vae_params, vae_weights=ckpt.vae_weights(),
                              tokenizer_kind="hf", tokenizer_file=tmp_path / "tokenizer.json", card="# test\n")
    first = hub.add_folder("owner/shapes", folder, tags=("v1",))
    (folder / "README.md").write_text("# changed\n")
    second = hub.add_folder("owner/shapes", folder)
    opts = HubOptions(endpoint=hub.url, cache_dir=tmp_path / "cache")
    resolved = resolve("owner/shapes@v1", hub_options=opts)
    assert resolved.format == "dalle_app" and resolved.tokenizer_kind == "hf"
    assert {r.commit for r in resolved.files} == {first} and {r.revision for r in resolved.files} == {"v1"}
    assert {r.filename for r in resolved.files} == {"config.json", "model.safetensors", "vae.safetensors",
                                                    "tokenizer.json"}
    for key, value in ckpt.state_dict.items():
        assert torch.equal(resolved.checkpoint.state_dict[key], value), key
    assert {r.commit for r in resolve("owner/shapes", hub_options=opts).files} == {second}
    hub.stop()  # second start: everything comes from the cache
    again = resolve("owner/shapes@v1", hub_options=opts)
    assert {r.commit for r in again.files} == {first}


def test_resolve_hub_paths_and_deepspeed_folder(hub, tmp_path):
    sd = mf.dalle_state_dict()
    client = mf.train_dalle_dict(sd)
    client.pop("weights")
    files = {
        "runs/a/dalle.pt": (tmp_path / "a.pt"),
        "dalle-ds-cp/global_step7/mp_rank_00_model_states.pt": (tmp_path / "ds.pt"),
    }
    torch.save(mf.train_dalle_dict(sd), files["runs/a/dalle.pt"])
    torch.save({"module": sd, **client}, files["dalle-ds-cp/global_step7/mp_rank_00_model_states.pt"])
    contents = {name: path.read_bytes() for name, path in files.items()}
    contents["dalle-ds-cp/latest"] = b"global_step7\n"
    hub.add_commit("owner/runs", contents)
    opts = HubOptions(endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert resolve("owner/runs:runs/a/dalle.pt", hub_options=opts).checkpoint.source_format == "train_dalle"
    assert resolve("owner/runs:runs/a", hub_options=opts).checkpoint.source_format == "train_dalle"
    ds = resolve("owner/runs:dalle-ds-cp", hub_options=opts)
    assert ds.checkpoint.source_format == "deepspeed"
    assert [r.filename for r in ds.files] == ["dalle-ds-cp/latest", "dalle-ds-cp/global_step7/mp_rank_00_model_states.pt"]
    with pytest.raises(ModelLoadError, match="'runs/b' is neither a file nor a folder"):
        resolve("owner/runs:runs/b", hub_options=opts)


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_vocab_mismatch_is_one_sentence(tmp_path):
    make_tokenizer_json(tmp_path / "tokenizer.json", 300)
    with pytest.raises(ModelLoadError) as err:
        choose_tokenizer(50, requested=None, found_kind="hf", found_file=tmp_path / "tokenizer.json")
    message = str(err.value)
    assert "num_text_tokens=50" in message and "300" in message and "\n" not in message
    tok, kind, path, _ = choose_tokenizer(300, requested=None, found_kind="hf", found_file=tmp_path / "tokenizer.json")
    assert tok.vocab_size == 300 and kind == "hf" and path == tmp_path / "tokenizer.json"


def test_requested_tokenizer_file_wins_and_missing_clip_vocab_is_explained(tmp_path, monkeypatch):
    make_tokenizer_json(tmp_path / "big.json", 300)
    make_tokenizer_json(tmp_path / "tokenizer.json", 50)
    tok, kind, path, records = choose_tokenizer(50, requested="hf=" + str(tmp_path / "tokenizer.json"),
                                                found_kind="hf", found_file=tmp_path / "big.json",
                                                allowed_roots=[tmp_path])
    assert tok.vocab_size == 50 and path == tmp_path / "tokenizer.json" and records[0].path == path
    make_tokenizer_json(tmp_path / "oddly_named.json", 50)
    with pytest.raises(ModelLoadError, match="write it as KIND=PATH"):
        choose_tokenizer(50, requested=str(tmp_path / "oddly_named.json"), found_kind=None, found_file=None,
                         allowed_roots=[tmp_path])
    assert choose_tokenizer(50, requested="hf=" + str(tmp_path / "oddly_named.json"), found_kind=None,
                            found_file=None, allowed_roots=[tmp_path])[0].vocab_size == 50
    monkeypatch.delenv("DALLE_APP_CLIP_VOCAB", raising=False)
    with pytest.raises(ModelLoadError, match="clip tokenizer .*DALLE_APP_CLIP_VOCAB"):
        choose_tokenizer(49408, requested=None, found_kind=None, found_file=None)
    with pytest.raises(ModelLoadError, match="num_text_tokens=1234"):
        choose_tokenizer(1234, requested=None, found_kind=None, found_file=None)
