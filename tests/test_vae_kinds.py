"""VQGanVAE and OpenAIDiscreteVAE against fixtures made by the real taming / dall_e / dalle-pytorch packages.

Fixtures: tests/fixtures/vae_kinds/, made once by tests/fixtures/make_vae_fixtures.py in a separate environment.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dalle_app.models.openai_dvae import (
    OpenAIDiscreteVAE,
    config_from_state_dict,
    convert_pickles,
    main,
    map_pixels,
    unmap_pixels,
)
from dalle_app.models.vqgan import (
    VQGanConfig,
    VQGanVAE,
    config_from_dict,
    infer_vqgan_config,
    parse_taming_yaml,
    strip_loss_keys,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vae_kinds"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = 1e-4


@pytest.fixture(autouse=True)
def exact_cuda_math():
    """TF32 convolutions/matmuls would put CUDA results ~1e-3 away from the float32 CPU reference."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def images_of(io, i, device="cpu"):
    return (io[f"images_{i}"].float() / 255).to(device)


def load_vqgan(name, device="cpu"):
    cfg = parse_taming_yaml((FIXTURES / f"{name}.yaml").read_text())
    vae = VQGanVAE.from_config(cfg)
    vae.load_taming_state_dict({"state_dict": load_file(FIXTURES / f"{name}_weights.safetensors")})
    return vae.eval().to(device), load_file(FIXTURES / f"{name}_io.safetensors")


def load_dvae(device="cpu"):
    vae = OpenAIDiscreteVAE(**MANIFEST["fixtures"]["openai_dvae"]["hparams"])
    vae.load_state_dict(load_file(FIXTURES / "openai_dvae_weights.safetensors"), strict=True)
    return vae.eval().to(device), load_file(FIXTURES / "openai_dvae_io.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# matches the reference

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["vqgan", "gumbel"])
def test_vqgan_matches_reference(name, device):
    vae, io = load_vqgan(name, device)
    for i in range(2):  # two image sizes per fixture (32 px and 48 px)
        ids = vae.get_codebook_indices(images_of(io, i, device))
        assert ids.dtype == torch.long
        assert torch.equal(ids.cpu(), io[f"indices_{i}"])
        decoded = vae.decode(io[f"indices_{i}"].to(device)).cpu()
        assert decoded.shape == io[f"decoded_{i}"].shape
        assert (decoded - io[f"decoded_{i}"]).abs().max().item() <= TOL


def test_gumbel_encoding_is_deterministic_by_default_and_can_sample_like_the_reference():
    vae, io = load_vqgan("gumbel")
    seed = MANIFEST["fixtures"]["gumbel"]["stochastic_seed"]
    x = images_of(io, 0)
    assert torch.equal(vae.get_codebook_indices(x), vae.get_codebook_indices(x))
    torch.manual_seed(seed)
    sampled = vae.get_codebook_indices(x, sample=True)
    assert torch.equal(sampled, io["indices_sampled_0"])
    assert not torch.equal(sampled, io["indices_0"])  # the reference's encode really is noisy
    vae.gumbel_sampling = True
    torch.manual_seed(seed)
    assert torch.equal(vae.get_codebook_indices(x), io["indices_sampled_0"])


@pytest.mark.parametrize("device", DEVICES)
def test_openai_dvae_matches_reference(device):
    vae, io = load_dvae(device)
    for i in range(2):  # 32 px -> 4x4 tokens, 64 px -> 8x8 tokens
        ids = vae.get_codebook_indices(images_of(io, i, device))
        assert torch.equal(ids.cpu(), io[f"indices_{i}"])
        decoded = vae.decode(io[f"indices_{i}"].to(device)).cpu()
        assert (decoded - io[f"decoded_{i}"]).abs().max().item() <= TOL


def test_pixel_mapping_round_trips():
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)
    assert map_pixels(torch.zeros(1, 1, 1, 1)).item() == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------------
# state_dict layouts

def test_taming_checkpoint_keys_load_strictly_only_without_loss_keys():
    sd = load_file(FIXTURES / "vqgan_weights.safetensors")
    assert any(k.startswith("loss.") for k in sd)  # the fixture ckpt carries a loss module like real ones
    vae = VQGanVAE.from_config(parse_taming_yaml((FIXTURES / "vqgan.yaml").read_text()))
    with pytest.raises(RuntimeError):
        vae.model.load_state_dict(sd, strict=True)
    vae.model.load_state_dict(strip_loss_keys(sd), strict=True)


@pytest.mark.parametrize("name", ["vqgan_imagenet_f16_1024", "vqgan_gumbel_f8_8192"])
def test_full_size_vqgan_layouts_match_taming(name):
    ref = json.loads((FIXTURES / "full_size_keys.json").read_text())[name]
    with torch.device("meta"):
        vae = VQGanVAE.from_config({"model": {"target": ref["target"], "params": ref["params"]}})
    ours = {k: list(v.shape) for k, v in vae.model.state_dict().items()}
    assert ours == ref["keys"]
    assert vae.num_layers == {"vqgan_imagenet_f16_1024": 4, "vqgan_gumbel_f8_8192": 3}[name]
    assert vae.image_size == 256 and vae.channels == 3 and vae.num_tokens == ref["params"]["n_embed"]


def test_full_size_openai_dvae_layout_matches_dall_e():
    ref = json.loads((FIXTURES / "full_size_keys.json").read_text())["openai_dvae"]["keys"]
    with torch.device("meta"):
        vae = OpenAIDiscreteVAE()
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == ref
    assert (vae.image_size, vae.num_layers, vae.num_tokens, vae.channels) == (256, 3, 8192, 3)


class Holder(nn.Module):
    """Stands in for DALLE: the VAE sits under `vae.`."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae


def test_dalle_checkpoint_style_vqgan_keys_load():
    sd = load_file(FIXTURES / "gumbel_weights.safetensors")
    dalle_sd = {f"vae.model.{k}": v for k, v in sd.items()}
    dalle_sd["vae.model.loss.discriminator.main.1.running_mean"] = torch.zeros(4)  # like a real checkpoint
    dalle_sd = strip_loss_keys(dalle_sd, prefix="vae.model.")
    cfg = infer_vqgan_config(dalle_sd, prefix="vae.model.", resolution=32)  # DALLE checkpoints hold no YAML
    holder = Holder(VQGanVAE(cfg))
    holder.load_state_dict(dalle_sd, strict=True)
    io = load_file(FIXTURES / "gumbel_io.safetensors")
    assert torch.equal(holder.vae.eval().get_codebook_indices(images_of(io, 0)), io["indices_0"])


def test_dalle_checkpoint_style_dvae_keys_load():
    sd = load_file(FIXTURES / "openai_dvae_weights.safetensors")
    dalle_sd = {f"vae.{k}": v for k, v in sd.items()}
    assert any(k.startswith("vae.enc.blocks.") for k in dalle_sd)
    assert any(k.startswith("vae.dec.blocks.") for k in dalle_sd)
    cfg = config_from_state_dict(dalle_sd, prefix="vae.")
    assert cfg == {**MANIFEST["fixtures"]["openai_dvae"]["hparams"], "group_count": 4, "channels": 3}
    holder = Holder(OpenAIDiscreteVAE(**cfg))
    holder.load_state_dict(dalle_sd, strict=True)
    io = load_file(FIXTURES / "openai_dvae_io.safetensors")
    assert torch.equal(holder.vae.eval().get_codebook_indices(images_of(io, 1)), io["indices_1"])


# ---------------------------------------------------------------------------------------------------------------
# configs

@pytest.mark.parametrize("name", ["vqgan", "gumbel"])
def test_vqgan_config_round_trip_and_inference(name):
    cfg = parse_taming_yaml((FIXTURES / f"{name}.yaml").read_text())
    vae = VQGanVAE.from_config(cfg)
    flat = json.loads(json.dumps(vae.to_config()))
    again = VQGanVAE.from_config(flat)
    assert again.config == vae.config and again.image_size == vae.image_size == 32
    assert flat["vae_type"] == "vqgan" and flat["gumbel"] == (name == "gumbel")
    assert config_from_dict(cfg["model"]) == config_from_dict(cfg["model"]["params"] | {"gumbel": name == "gumbel"})
    sd = load_file(FIXTURES / f"{name}_weights.safetensors")
    assert infer_vqgan_config(strip_loss_keys(sd), resolution=32) == vae.config


def test_openai_dvae_config_round_trip():
    vae = OpenAIDiscreteVAE(n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8, image_size=64)
    flat = json.loads(json.dumps(vae.to_config()))
    again = OpenAIDiscreteVAE.from_config(flat)
    assert again.to_config() == flat and flat["vae_type"] == "openai_dvae"
    assert [k for k in again.state_dict()] == [k for k in vae.state_dict()]
    assert (again.image_size, again.num_layers, again.num_tokens) == (64, 2, 32)


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError, match="target"):
        config_from_dict({"model": {"target": "taming.models.vqgan.EMAVQ", "params": {"embed_dim": 4, "n_embed": 8}}})
    with pytest.raises(ValueError, match="embed_dim"):
        config_from_dict({"model": {"target": "taming.models.vqgan.VQModel", "params": {"ddconfig": {}}}})
    with pytest.raises(ValueError, match="model"):
        parse_taming_yaml("foo: 1\n")
    with pytest.raises(ValueError, match="z_channels"):
        VQGanConfig(gumbel=True, embed_dim=64, z_channels=32)
    with pytest.raises(ValueError, match="multiple"):
        VQGanVAE(VQGanConfig(ch=32, ch_mult=(1, 1), attn_resolutions=(), z_channels=8, embed_dim=8), image_size=33)


# ---------------------------------------------------------------------------------------------------------------
# shapes at other sizes

def test_vqgan_attributes_follow_the_config():
    cfg = VQGanConfig(embed_dim=8, n_embed=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(16,),
                      resolution=64, z_channels=8)
    vae = VQGanVAE(cfg).eval()
    assert (vae.image_size, vae.num_layers, vae.num_tokens, vae.channels) == (64, 2, 16, 3)
    for size in (64, 96):
        ids = vae.get_codebook_indices(torch.rand(2, 3, size, size))
        assert ids.shape == (2, (size // 4) ** 2) and 0 <= ids.min() and ids.max() < 16
        out = vae.decode(ids)
        assert out.shape == (2, 3, size, size) and 0 <= out.min() and out.max() <= 1
    assert VQGanVAE(cfg, image_size=128).image_size == 128
    with pytest.raises(ValueError, match="square"):
        vae.decode(torch.zeros(1, 12, dtype=torch.long))
    assert vae.decode(torch.zeros(1, 3, 4, dtype=torch.long)).shape == (1, 3, 12, 16)


def test_openai_dvae_shapes_at_small_sizes():
    vae = OpenAIDiscreteVAE(n_hid=8, n_blk_per_group=1, vocab_size=16, n_init=8, image_size=64).eval()
    ids = vae.get_codebook_indices(torch.rand(1, 3, 64, 64))
    assert ids.shape == (1, 64) and ids.dtype == torch.long
    out = vae.decode(ids)
    assert out.shape == (1, 3, 64, 64) and 0 <= out.min() and out.max() <= 1


def test_pickle_converter_refuses_clearly_without_dall_e(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dall_e", None)  # makes `import dall_e` fail
    with pytest.raises(SystemExit, match="dall_e"):
        convert_pickles(str(tmp_path / "encoder.pkl"), str(tmp_path / "decoder.pkl"), str(tmp_path / "out.safetensors"))
    with pytest.raises(SystemExit, match="usage"):
        main(["convert", "encoder.pkl"])
    assert not (tmp_path / "out.safetensors").exists()
