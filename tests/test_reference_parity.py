"""Parity of dalle_app.models with the real DALLE-pytorch releases.

The fixtures in tests/fixtures/reference/ were written by tests/fixtures/make_reference_fixtures.py
running the real dalle-pytorch 1.6.6 (and 1.4.2 ... 0.14.3 for history) in a separate venv; see
manifest.json for the exact constructor arguments, versions and how each output was produced.
Only the project's code is imported here.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
TOL = MANIFEST["tolerance"]  # max abs difference, float32 on the CPU

CONFIGS = {c["name"]: c for c in MANIFEST["configs"]}
DALLE_NAMES = [n for n, c in CONFIGS.items() if c["class"] == "DALLE"]
VAE_NAMES = [n for n, c in CONFIGS.items() if c["class"] == "DiscreteVAE"]
DALLE_CHECKPOINTS = [c for c in MANIFEST["checkpoints"] if c["name"] != "vae"]
TUPLE_ARGS = ("attn_types", "shared_attn_ids", "shared_ff_ids")


@pytest.fixture(scope="module")
def models():
    """The project's model classes (imported lazily so a missing module fails tests, not collection)."""
    from dalle_app import models as project_models
    return project_models


def load_fixture(name):
    """Split a fixture file into its state / in / out dictionaries."""
    parts = {"state": {}, "in": {}, "out": {}}
    for key, value in load_file(FIXTURES / CONFIGS[name]["file"]).items():
        prefix, rest = key.split("/", 1)
        parts[prefix][rest] = value
    return parts


def kwargs_of(entry, key="kwargs"):
    """Constructor kwargs from the manifest, with JSON lists turned back into the tuples the reference got."""
    return {k: tuple(v) if k in TUPLE_ARGS and v is not None else v for k, v in entry[key].items()}


def build(models, entry, **extra):
    """Build the project's model for a manifest entry, in eval mode."""
    if entry["class"] == "DALLE":
        vae = models.DiscreteVAE(**entry["vae_kwargs"])
        model = models.DALLE(vae=vae, **kwargs_of(entry), **entry.get("project_kwargs", {}), **extra)
    else:
        model = getattr(models, entry["class"])(**kwargs_of(entry))
    return model.eval()


def same_key(key):
    """axial_positional_embedding >= 0.3 says `weights.0`, <= 0.2.1 (real checkpoints) `weights_0`."""
    return key.replace("image_pos_emb.weights_", "image_pos_emb.weights.")


def max_diff(a, b):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------ state dicts

@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_and_shapes_match_reference(models, name):
    ref = load_fixture(name)["state"]
    model = build(models, CONFIGS[name])
    ours = {same_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {same_key(k): tuple(v.shape) for k, v in ref.items()}
    assert sorted(set(theirs) - set(ours)) == [], "keys missing from the project's state_dict"
    assert sorted(set(ours) - set(theirs)) == [], "keys the reference does not have"
    wrong = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert wrong == {}, "shape mismatches (ours, reference)"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_state_dict_loads_strict_and_round_trips(models, name):
    ref = load_fixture(name)["state"]
    model = build(models, CONFIGS[name])
    model.load_state_dict(ref, strict=True)
    ours = {same_key(k): v for k, v in model.state_dict().items()}
    for key, value in ref.items():
        assert torch.equal(ours[same_key(key)].to(value.dtype), value), f"{key} changed by load/state_dict"


# ------------------------------------------------------------------------------ outputs

@pytest.mark.parametrize("name", DALLE_NAMES)
def test_dalle_logits_match_reference(models, name):
    fx = load_fixture(name)
    model = build(models, CONFIGS[name])
    model.load_state_dict(fx["state"], strict=True)
    text, image_ids = fx["in"]["text"], fx["in"]["image_ids"]
    with torch.no_grad():
        logits = model(text.clone(), image_ids.clone())
        partial = model(text.clone(), fx["in"]["image_ids_partial"].clone())
    assert max_diff(logits, fx["out"]["logits"]) <= TOL, "forward(text, image_ids)"
    assert max_diff(partial, fx["out"]["logits_partial"]) <= TOL, "forward(text, image_ids_partial)"


@pytest.mark.parametrize("name", [n for n in DALLE_NAMES if "loss" in CONFIGS[n].get("outputs", {})])
def test_dalle_loss_matches_reference(models, name):
    fx = load_fixture(name)
    model = build(models, CONFIGS[name])
    model.load_state_dict(fx["state"], strict=True)
    with torch.no_grad():
        loss = model(fx["in"]["text"].clone(), fx["in"]["image_ids"].clone(), return_loss=True)
    assert max_diff(loss.reshape(1), fx["out"]["loss"]) <= TOL


@pytest.mark.parametrize("name", VAE_NAMES)
def test_discrete_vae_matches_reference(models, name):
    fx = load_fixture(name)
    vae = build(models, CONFIGS[name])
    vae.load_state_dict(fx["state"], strict=True)
    images = fx["in"]["images"]
    with torch.no_grad():
        indices = vae.get_codebook_indices(images.clone())
        assert torch.equal(indices.long(), fx["out"]["indices"]), "get_codebook_indices(images)"
        assert max_diff(vae(images.clone(), return_logits=True), fx["out"]["encoder_logits"]) <= TOL
        assert max_diff(vae.decode(indices), fx["out"]["decoded_indices"]) <= TOL, "decode(indices)"
        assert max_diff(vae.decode(fx["in"]["ids"]), fx["out"]["decoded_ids"]) <= TOL, "decode(ids)"
    assert torch.equal(images, fx["in"]["images"]), "get_codebook_indices changed the caller's images"


def test_clip_matches_reference(models):
    fx = load_fixture("clip")
    clip = build(models, CONFIGS["clip"])
    clip.load_state_dict(fx["state"], strict=True)
    text, images, mask = fx["in"]["text"], fx["in"]["images"], fx["in"]["text_mask"]
    with torch.no_grad():
        assert max_diff(clip(text, images, text_mask=mask), fx["out"]["scores"]) <= TOL, "scores with text_mask"
        assert max_diff(clip(text, images), fx["out"]["scores_no_mask"]) <= TOL, "scores without text_mask"
        loss = clip(text, images, text_mask=mask, return_loss=True)
    assert max_diff(loss.reshape(1), fx["out"]["loss"]) <= TOL, "return_loss=True"


# ------------------------------------------------------------------------------ historical checkpoints

def _normalized(key):
    return ".".join(p for p in same_key(key).split(".") if p != "fn")


def remap_old_weights(weights, model):
    """Test-local stand-in for the manager's remap: match keys ignoring wrapper depth (`fn.` levels)
    and the axial key spelling, pad a 1.0.2-1.1.1 `(1, 1, L, w)` pos_emb with our table's last row,
    cast float16 to float32."""
    target = model.state_dict()
    by_norm = {_normalized(k): k for k in target}
    out = {}
    for key, value in weights.items():
        new_key = by_norm[_normalized(key)]
        if key.endswith("pos_emb") and value.ndim == 4:
            value = torch.cat((value[0], target[new_key][:, value.shape[2]:]), dim=1)
        out[new_key] = value.float()
    return out


@pytest.mark.parametrize("entry", DALLE_CHECKPOINTS, ids=lambda e: e["name"])
def test_historical_checkpoint_logits_match_writing_release(models, entry):
    """Old train_dalle.py checkpoints: weights_only load, remapped keys, pre-1.5.0 conv window."""
    ckpt = torch.load(FIXTURES / entry["file"], weights_only=True)
    expected = load_file(FIXTURES / entry["expected"])
    text, image_ids = expected["in/text"], expected["in/image_ids"]
    kwargs = {k: tuple(v) if k in TUPLE_ARGS and v is not None else v for k, v in entry["kwargs_1.6.6"].items()}
    for window, key in (("centered", "out/logits_native"), ("above_left", "out/logits_1.6.6")):
        extra = {"conv_like_window": window} if "conv_like" in kwargs["attn_types"] else {}
        model = models.DALLE(vae=models.DiscreteVAE(**entry["vae_kwargs"]), **kwargs, **extra).eval()
        model.load_state_dict(remap_old_weights(ckpt["weights"], model), strict=True)
        with torch.no_grad():
            logits = model(text.clone(), image_ids.clone())
        assert max_diff(logits, expected[key]) <= TOL, f"{key} (conv_like_window={window})"


def test_train_vae_checkpoint_matches_reference(models):
    entry = next(c for c in MANIFEST["checkpoints"] if c["name"] == "vae")
    ckpt = torch.load(FIXTURES / entry["file"], weights_only=True)
    expected = load_file(FIXTURES / entry["expected"])
    vae = models.DiscreteVAE(**ckpt["hparams"]).eval()
    vae.load_state_dict(ckpt["weights"], strict=True)
    with torch.no_grad():
        indices = vae.get_codebook_indices(expected["in/images"])
        assert torch.equal(indices.long(), expected["out/indices"])
        assert max_diff(vae.decode(indices), expected["out/decoded"]) <= TOL
