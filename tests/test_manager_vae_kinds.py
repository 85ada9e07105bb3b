"""The VAE registry builds every VAE kind from params read off its weights (what DALLE checkpoints give)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dalle_app.manager import ModelLoadError, VaeCheckpoint, build_vae, read_checkpoint, register_vae_kind, vae_kinds
from dalle_app.manager.vae_registry import vae_geometry, vae_params_from_weights

import manager_factory as mf

FIXTURES = Path(__file__).parent / "fixtures" / "vae_kinds"
pytestmark = pytest.mark.skipif(not (FIXTURES / "manifest.json").is_file(), reason="vae_kinds fixtures missing")


def _weights(name):
    """The fixture's taming weights without its training-loss module."""
    return {k: v.float() for k, v in load_file(str(FIXTURES / name)).items() if not k.startswith("loss.")}


def test_registry_lists_dalle_pytorch_class_names():
    assert vae_kinds()[:3] == ["DiscreteVAE", "OpenAIDiscreteVAE", "VQGanVAE"]


@pytest.mark.parametrize("name, yaml", [("vqgan", "vqgan.yaml"), ("gumbel", "gumbel.yaml")])
def test_vqgan_from_weights_matches_vqgan_from_yaml(tmp_path, name, yaml):
    from dalle_app.models.vqgan import parse_taming_yaml

    weights = _weights(f"{name}_weights.safetensors")
    # as inside a DALLE checkpoint: vae.model.* plus loss tensors that must be dropped
    dalle = mf.dalle_state_dict(vae=None, vae_sd={"model." + k: v for k, v in weights.items()})
    dalle["vae.model.loss.discriminator.main.0.weight"] = torch.zeros(3)  # must be dropped
    torch.save(mf.train_dalle_dict(dalle, vae_params=None, vae_class_name="VQGanVAE"), tmp_path / "dalle.pt")
    ckpt = read_checkpoint(tmp_path / "dalle.pt")
    params = vae_params_from_weights("VQGanVAE", ckpt.vae_weights(), fmap_size=None)
    assert params["gumbel"] is (name == "gumbel") and params["n_embed"] == 64
    from_weights = build_vae("VQGanVAE", params)
    from_weights.load_state_dict(ckpt.vae_weights(), strict=True)
    from_yaml = build_vae("VQGanVAE", parse_taming_yaml((FIXTURES / yaml).read_text()))
    from_yaml.load_state_dict({"model." + k: v for k, v in weights.items()}, strict=True)
    ids = load_file(str(FIXTURES / f"{name}_io.safetensors"))["indices_0"][:1]
    assert torch.allclose(from_weights.decode(ids), from_yaml.decode(ids), atol=1e-6)
    # a taming Lightning .ckpt of the same weights reads as a VAE checkpoint
    torch.save({"state_dict": {**weights, "loss.logvar": torch.zeros(())}}, tmp_path / "vqgan.ckpt")
    vae = read_checkpoint(tmp_path / "vqgan.ckpt")
    assert isinstance(vae, VaeCheckpoint) and vae.kind == "VQGanVAE"
    from_weights.load_state_dict(vae.state_dict, strict=True)


def test_openai_dvae_from_weights_and_token_grid():
    weights = _weights("openai_dvae_weights.safetensors")
    params = vae_params_from_weights("OpenAIDiscreteVAE", weights, fmap_size=4)
    vae = build_vae("OpenAIDiscreteVAE", params)
    vae.load_state_dict(weights, strict=True)
    assert vae_geometry(vae) == (64, 4, 32)


def test_unknown_or_broken_kinds_fail_in_one_sentence():
    with pytest.raises(ModelLoadError, match="Unknown VAE kind 'Nope'"):
        build_vae("Nope", {})
    register_vae_kind("Broken", "dalle_app.models.does_not_exist:Thing")
    try:
        with pytest.raises(ModelLoadError, match="cannot be imported"):
            build_vae("Broken", {})
    finally:
        from dalle_app.manager import vae_registry

        vae_registry._REGISTRY.pop("Broken")
    with pytest.raises(ModelLoadError, match="cannot be built"):
        build_vae("OpenAIDiscreteVAE", {"no_such_argument": 1})
