"""Checkpoint formats: every DALLE-pytorch vintage normalises to the 1.6.6 layout; bad files give one sentence."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle_app.manager import DalleCheckpoint, ModelLoadError, VaeCheckpoint, read_checkpoint, rotary_table
from dalle_app.manager.hparams import check_vae_match
from dalle_app.manager.remap import dedupe_shared, expand_shared, extend_rotary_table

import manager_factory as mf

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


def _assert_same_weights(got: dict, want: dict):
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
    for key in want:
        assert got[key].dtype == torch.float32, key
        assert torch.equal(got[key], want[key].float()), key


def _one_sentence(err):
    message = str(err.value)
    assert "\n" not in message and message.endswith((".", ")")), message
    return message


# ------------------------------------------------------------------------------------------ train_dalle.py dicts
def test_current_train_dalle_dict_loads_unchanged(tmp_path):
    sd = mf.dalle_state_dict()
    torch.save(mf.train_dalle_dict(sd), tmp_path / "dalle.pt")
    ckpt = read_checkpoint(tmp_path / "dalle.pt")
    assert isinstance(ckpt, DalleCheckpoint)
    assert ckpt.version == "1.6.6" and ckpt.conv_like_window == "above_left" and ckpt.source_format == "train_dalle"
    assert ckpt.vae_kind == "DiscreteVAE" and ckpt.vae_params == mf.VAE_PARAMS
    assert ckpt.hparams["attn_types"] == ("full", "axial_row") and ckpt.image_fmap_size == 8
    assert ckpt.notes == []
    _assert_same_weights(ckpt.state_dict, sd)


@pytest.mark.parametrize("shift", [True, False])
def test_pre_1_4_wrapper_depth_and_axial_names(tmp_path, shift):
    h = dict(mf.HPARAMS, shift_tokens=shift, rotary_emb=False)
    sd = mf.dalle_state_dict(h)
    old = mf.to_old_layout(sd, shift_tokens=shift)
    assert any(".weights_0" in k for k in old) and set(old) != set(sd)
    torch.save(mf.train_dalle_dict(old, hparams=h, version="1.2.2"), tmp_path / "old.pt")
    ckpt = read_checkpoint(tmp_path / "old.pt")
    _assert_same_weights(ckpt.state_dict, sd)
    assert ckpt.conv_like_window == "centered"  # < 1.5.0


def test_1_0_rotary_table_gets_its_last_row(tmp_path):
    sd = mf.dalle_state_dict()
    old = mf.to_old_layout(sd, shift_tokens=True, short_pos_emb=True)
    assert old["transformer.pos_emb"].shape == (1, 1, 8 + 64, 60)
    h = {k: v for k, v in mf.HPARAMS.items() if k not in ("shared_attn_ids", "shared_ff_ids", "share_input_output_emb")}
    torch.save(mf.train_dalle_dict(old, hparams=h, version=None, vae_class_name=None), tmp_path / "v1.0.pt")
    ckpt = read_checkpoint(tmp_path / "v1.0.pt")
    assert ckpt.state_dict["transformer.pos_emb"].shape == (1, 8 + 64 + 1, 60)
    _assert_same_weights(ckpt.state_dict, sd)
    assert ckpt.version is None and ckpt.conv_like_window == "centered" and ckpt.vae_kind == "DiscreteVAE"


def test_rotary_row_rebuilt_from_other_frequencies():
    # a table built with different (e.g. log-spaced) frequencies: the rebuilt row must follow the stored table
    full = rotary_table(8, 4, 64) * torch.linspace(0.5, 2.0, 60)
    rebuilt = extend_rotary_table(full[:, :-1][None], text_seq_len=8, fmap_size=4)
    assert torch.equal(rebuilt, full)


def test_oldest_bare_state_dict_gets_old_defaults_and_inferred_sizes(tmp_path):
    h = dict(mf.HPARAMS, rotary_emb=False, shift_tokens=False, attn_types=("full",))
    sd = mf.dalle_state_dict(h)
    torch.save(mf.to_old_layout(sd, shift_tokens=False), tmp_path / "oldest.pt")
    ckpt = read_checkpoint(tmp_path / "oldest.pt")
    assert ckpt.source_format == "state_dict" and ckpt.version is None
    for key, value in dict(shift_tokens=False, rotary_emb=False, attn_types=("full",), stable=False,
                           reversible=False, dim=32, depth=2, text_seq_len=8, num_text_tokens=50, heads=2,
                           dim_head=64).items():
        assert ckpt.hparams[key] == value, key
    assert ckpt.vae_params == mf.VAE_PARAMS  # rebuilt from the vae.* weights and the 8x8 position table
    _assert_same_weights(ckpt.state_dict, sd)


def test_legacy_vae_entry_and_unknown_hparams_are_dropped(tmp_path):
    sd = mf.dalle_state_dict()
    hparams = dict(mf.HPARAMS, vae={"was": "a pickled VAE"}, some_fork_option=3)
    torch.save(mf.train_dalle_dict(sd, hparams=hparams), tmp_path / "legacy.pt")
    ckpt = read_checkpoint(tmp_path / "legacy.pt")
    assert "vae" not in ckpt.hparams and "some_fork_option" not in ckpt.hparams
    assert any("legacy 'vae'" in n for n in ckpt.notes)


def test_layerscale_missing_means_scale_one(tmp_path):
    sd = mf.dalle_state_dict()
    no_scale = {k: v for k, v in sd.items() if not k.endswith(".scale")}
    torch.save(mf.train_dalle_dict(no_scale), tmp_path / "noscale.pt")
    ckpt = read_checkpoint(tmp_path / "noscale.pt")
    assert torch.equal(ckpt.state_dict["transformer.layers.layers.1.0.scale"], torch.ones(1, 1, 32))


def test_fp16_is_cast_and_sharing_is_kept(tmp_path):
    sd = {k: v.half() for k, v in mf.dalle_state_dict(dict(mf.HPARAMS, share_input_output_emb=True)).items()}
    sd["text_emb.linear.weight"] = sd["to_logits.1.weight"]  # alias, as share_input_output_emb saves it
    torch.save(mf.train_dalle_dict(sd), tmp_path / "fp16.pt")
    ckpt = read_checkpoint(tmp_path / "fp16.pt")
    got = ckpt.state_dict
    assert all(v.dtype == torch.float32 for v in got.values() if v.is_floating_point())
    assert got["text_emb.linear.weight"].data_ptr() == got["to_logits.1.weight"].data_ptr()
    unique, aliases = dedupe_shared(got)
    assert aliases == {"text_emb.linear.weight": "to_logits.1.weight"}
    assert expand_shared(unique, aliases).keys() == got.keys()


# ------------------------------------------------------------------------------------------ other containers
def test_deepspeed_file_and_folder(tmp_path):
    sd = mf.dalle_state_dict()
    client = mf.train_dalle_dict(sd)
    client.pop("weights")
    states = {"module": sd, "buffer_names": [], "optimizer": None, "param_shapes": [{"a": torch.Size([2])}],
              "global_steps": 10, "ds_config": {"train_batch_size": 4}, "ds_version": "0.5.8", **client}
    folder = tmp_path / "dalle-ds-cp"
    (folder / "global_step10").mkdir(parents=True)
    torch.save(states, folder / "global_step10" / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("global_step10")
    torch.save({**client, "weights": "see mp_rank_00_model_states.pt"}, folder / "auxiliary.pt")
    for path in (folder, folder / "global_step10" / "mp_rank_00_model_states.pt"):
        ckpt = read_checkpoint(path)
        assert ckpt.source_format == "deepspeed" and ckpt.hparams["depth"] == 2
        _assert_same_weights(ckpt.state_dict, sd)
    with pytest.raises(ModelLoadError, match="-ds-cp"):
        read_checkpoint(folder / "auxiliary.pt")
    (folder / "latest").write_text("global_step99")
    with pytest.raises(ModelLoadError, match="global_step99"):
        read_checkpoint(folder)


def test_bare_state_dict_with_model_prefix_and_given_hparams(tmp_path):
    sd = mf.dalle_state_dict()
    torch.save({"model." + k: v for k, v in sd.items()}, tmp_path / "model_state.pt")
    ckpt = read_checkpoint(tmp_path / "model_state.pt", hparams=mf.HPARAMS)
    _assert_same_weights(ckpt.state_dict, sd)
    assert ckpt.hparams["shift_tokens"] is True and ckpt.hparams["rotary_emb"] is True
    # safetensors holds the same bare state_dict
    save_file(sd, str(tmp_path / "dalle.safetensors"))
    _assert_same_weights(read_checkpoint(tmp_path / "dalle.safetensors", hparams=mf.HPARAMS).state_dict, sd)


def test_train_vae_dict_and_taming_ckpt(tmp_path):
    vae_sd = mf.discrete_vae_state_dict()
    torch.save({"hparams": mf.VAE_PARAMS, "weights": vae_sd}, tmp_path / "vae.pt")
    vae = read_checkpoint(tmp_path / "vae.pt")
    assert isinstance(vae, VaeCheckpoint) and vae.kind == "DiscreteVAE" and vae.params == mf.VAE_PARAMS
    _assert_same_weights(vae.state_dict, vae_sd)
    taming = {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "quantize.embedding.weight": torch.zeros(16, 4),
              "loss.discriminator.main.0.weight": torch.zeros(2)}
    torch.save({"state_dict": taming, "global_step": 5}, tmp_path / "vqgan.ckpt")
    vq = read_checkpoint(tmp_path / "vqgan.ckpt")
    assert vq.kind == "VQGanVAE" and set(vq.state_dict) == {"model.encoder.conv_in.weight",
                                                            "model.quantize.embedding.weight"}


def test_vqgan_inside_dalle_drops_loss_and_is_recognised(tmp_path):
    vq = {"model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "model.quantize.embed.weight": torch.zeros(64, 4),
          "model.loss.perceptual_loss.net.slice1.0.weight": torch.zeros(2)}
    sd = mf.dalle_state_dict(vae=None, vae_sd=vq)
    torch.save(mf.train_dalle_dict(sd, vae_params=None, vae_class_name=None), tmp_path / "dalle.pt")
    ckpt = read_checkpoint(tmp_path / "dalle.pt")
    assert ckpt.vae_kind == "VQGanVAE" and ckpt.vae_params is None
    assert not any(".loss." in k for k in ckpt.state_dict)
    assert set(ckpt.vae_weights()) == {"model.encoder.conv_in.weight", "model.quantize.embed.weight"}


# ------------------------------------------------------------------------------------------ refusals and errors
def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"hparams": mf.HPARAMS, "weights": mf.dalle_state_dict(), "extra": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError) as err:
        read_checkpoint(tmp_path / "evil.pt")
    message = _one_sentence(err)
    assert "refused" in message and "system" in message
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_checkpoint(tmp_path, cut):
    torch.save(mf.train_dalle_dict(mf.dalle_state_dict()), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelLoadError) as err:
        read_checkpoint(tmp_path / "cut.pt")
    assert "truncated" in _one_sentence(err)


@pytest.mark.parametrize("content, phrase", [(b"<html>404 Not Found</html>", "not a PyTorch checkpoint"),
                                             (b"", "empty")])
def test_not_a_checkpoint(tmp_path, content, phrase):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(ModelLoadError) as err:
        read_checkpoint(tmp_path / "x.pt")
    assert phrase in _one_sentence(err)


def test_truncated_safetensors(tmp_path):
    save_file(mf.dalle_state_dict(), str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        read_checkpoint(tmp_path / "m.safetensors", hparams=mf.HPARAMS)


@pytest.mark.parametrize("change, hparam", [
    (dict(num_text_tokens=49408), "num_text_tokens"),
    (dict(text_seq_len=16), "text_seq_len"),
    (dict(depth=4), "depth=2"),
    (dict(heads=4), "heads"),
    (dict(dim=64), "dim=32"),
    (dict(rotary_emb=False), "rotary_emb=True"),
    (dict(shift_tokens=False), "shift_tokens=True"),
])
def test_size_mismatch_names_the_hparam(tmp_path, change, hparam):
    torch.save(mf.train_dalle_dict(mf.dalle_state_dict(), hparams=dict(mf.HPARAMS, **change)), tmp_path / "d.pt")
    with pytest.raises(ModelLoadError) as err:
        read_checkpoint(tmp_path / "d.pt")
    assert hparam in _one_sentence(err)


def test_vae_mismatch_names_the_vae():
    sd = mf.dalle_state_dict(dict(mf.HPARAMS, rotary_emb=False))
    h = dict(mf.HPARAMS, rotary_emb=False)
    check_vae_match(h, sd, 64, 8, "DiscreteVAE", "d.pt")  # the right VAE passes
    with pytest.raises(ModelLoadError, match="1024 codes.*VAE the model was trained with"):
        check_vae_match(h, sd, 1024, 8, "VQGanVAE, 1024 codes", "d.pt")
    with pytest.raises(ModelLoadError, match="8x8 token grid.*16x16"):
        check_vae_match(h, {k: v for k, v in sd.items() if k != "to_logits.1.weight"}, 64, 16, "DiscreteVAE", "d.pt")


# ------------------------------------------------------------------------------------------ real old releases
def _reference_checkpoints():
    manifest = REFERENCE / "manifest.json"
    if not manifest.is_file():
        return []
    return [c for c in json.loads(manifest.read_text()).get("checkpoints", []) if "kwargs_1.6.6" in c]


@pytest.mark.parametrize("entry", _reference_checkpoints(), ids=lambda c: c["name"])
def test_checkpoints_written_by_old_releases(entry):
    """Files written by dalle-pytorch 0.14.3 .. 1.4.2 give the 1.6.6 kwargs and a 1.6.6 key layout."""
    ckpt = read_checkpoint(REFERENCE / entry["file"])
    for key, value in entry["kwargs_1.6.6"].items():
        assert ckpt.hparams[key] == (tuple(value) if isinstance(value, list) else value), key
    assert ckpt.vae_kind == "DiscreteVAE" and {k: ckpt.vae_params[k] for k in entry["vae_kwargs"]} == entry["vae_kwargs"]
    written = tuple(int(x) for x in entry["written_by"].split("."))
    assert ckpt.conv_like_window == ("centered" if written < (1, 5, 0) else "above_left")
    h = dict(mf.HPARAMS, **{k: tuple(v) if isinstance(v, list) else v for k, v in entry["kwargs_1.6.6"].items()})
    want = mf.dalle_state_dict(h, entry["vae_kwargs"])
    if h.get("share_input_output_emb"):
        want = {k: v for k, v in want.items() if k not in ("text_emb.weight", "image_emb.weight")}
        want.update({f"{n}_emb.linear.{p}": want[f"to_logits.1.{p}"] for n in ("text", "image") for p in ("weight", "bias")})
    assert set(ckpt.state_dict) == set(want), sorted(set(ckpt.state_dict) ^ set(want))[:6]
    for key, value in want.items():
        assert ckpt.state_dict[key].shape == value.shape and ckpt.state_dict[key].dtype == torch.float32, key
    if "transformer.pos_emb" in want and entry["weights_dtype"] == "float32":
        assert torch.equal(ckpt.state_dict["transformer.pos_emb"], want["transformer.pos_emb"])


def test_reference_vae_pt():
    if not (REFERENCE / "checkpoints" / "vae.pt").is_file():
        pytest.skip("reference fixtures not generated")
    vae = read_checkpoint(REFERENCE / "checkpoints" / "vae.pt")
    assert vae.kind == "DiscreteVAE" and vae.params["channels"] == 3
    dalle = read_checkpoint(REFERENCE / "checkpoints" / "dalle_v0.14.3_plain.pt")
    for key, value in vae.state_dict.items():  # same weights as vae.* inside the 0.14.3 checkpoint
        assert torch.equal(dalle.state_dict["vae." + key], value)
    assert load_file(str(REFERENCE / "checkpoints" / "vae.expected.safetensors"))


def test_rotary_table_matches_the_models_table():
    attention = pytest.importorskip("dalle_app.models.attention")
    for text_seq_len, fmap, dim_head in ((8, 4, 64), (16, 8, 16), (3, 2, 32)):
        ours = rotary_table(text_seq_len, fmap, dim_head)
        assert torch.equal(ours, attention.rotary_table(text_seq_len + 1, fmap, dim_head))
