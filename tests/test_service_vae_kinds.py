"""Service.reconstruct for every VAE kind with reference fixtures (VQGAN, Gumbel VQGAN, OpenAI dVAE): the model is
written in the project format and loaded by the manager, as a user's would be; the outputs are checked against
what DALLE-pytorch 1.6.6 computed on the same weights and images (tests/fixtures/vae_kinds)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("youtokentome")

from dalle_app.images import psnr, token_grid_picture
from dalle_app.manager import ModelManager, build_vae
from dalle_app.manager.vae_registry import vae_geometry, vae_params_from_weights
from dalle_app.service import Service

from app_factory import make_tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "vae_kinds"
pytestmark = pytest.mark.skipif(not (FIXTURES / "manifest.json").is_file(), reason="vae_kinds fixtures missing")
KINDS = {"vqgan": "VQGanVAE", "gumbel": "VQGanVAE", "openai_dvae": "OpenAIDiscreteVAE"}


def _fixture_vae(name: str):
    """(kind, params, VAE module with the fixture's weights), as make_tiny_model takes them."""
    weights = {k: v.float() for k, v in load_file(str(FIXTURES / f"{name}_weights.safetensors")).items()
               if not k.startswith("loss.")}
    kind = KINDS[name]
    if kind == "VQGanVAE":
        from dalle_app.models.vqgan import parse_taming_yaml

        vae = build_vae(kind, parse_taming_yaml((FIXTURES / f"{name}.yaml").read_text()))
        vae.load_state_dict({"model." + k: v for k, v in weights.items()}, strict=True)
        return kind, vae.to_config(), vae.eval()
    params = vae_params_from_weights(kind, weights, fmap_size=4)  # 32 px images, as the fixture's inputs
    vae = build_vae(kind, params)
    vae.load_state_dict(weights, strict=True)
    return kind, params, vae.eval()


@pytest.fixture(scope="module", params=list(KINDS))
def loaded(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"vae_{name}")
    folder = make_tiny_model(root / "model", vae=_fixture_vae(name), with_clip=False)
    manager = ModelManager(device="cpu", dtype="fp32", allowed_roots=[root])
    return name, root, Service(str(folder), manager=manager, output_dir=root / "out")


def _pixels(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def test_reconstruct_matches_the_reference_for_each_vae_kind(loaded):
    name, root, service = loaded
    io = load_file(str(FIXTURES / f"{name}_io.safetensors"))
    codes, side, size = vae_geometry(service.model.vae)
    assert (service.model.config["vae"]["kind"], size) == (KINDS[name], 32)
    image = io["images_0"][0]  # (3, 32, 32) uint8, one of the images the reference encoded
    path = root / "input.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    last = list(service.reconstruct(str(path)))[-1]
    info = last.info
    assert [picture.size for picture in last.images] == [(size, size)] * 3 and len(last.files) == 3
    assert torch.equal(_pixels(last.images[0]), image.float() / 255)  # 32 px: the input is not resized
    reference_ids = io["indices_0"][0]
    assert info["tokens"] == side * side == reference_ids.numel()  # the VAE's token grid
    assert info["codebook_size"] == codes == 64
    assert info["codebook_used"] == int(reference_ids.unique().numel()) and 1 <= info["codebook_used"] <= 64
    assert info["codebook_usage"] == round(info["codebook_used"] / codes, 4) and 0 < info["codebook_usage"] <= 1
    # the token grid picture is that of the reference's codes: same codes, side x side cells
    assert list(last.images[2].getdata()) == list(token_grid_picture(reference_ids, size).getdata())
    reference = io["decoded_0"][0]  # the reference's reconstruction, in [0, 1]
    assert (_pixels(last.images[1]) - reference).abs().max() <= 0.5 / 255 + 1e-4  # the PNG rounds to 8 bits
    expected_psnr = psnr(image.float() / 255, reference)  # random weights: a poor but definite reconstruction
    assert math.isfinite(info["psnr_db"]) and 3 < info["psnr_db"] < 40
    assert abs(info["psnr_db"] - expected_psnr) < 0.01, (info["psnr_db"], expected_psnr)


def test_reconstruct_resizes_any_picture_to_the_vae_for_each_vae_kind(loaded):
    name, root, service = loaded
    _, side, size = vae_geometry(service.model.vae)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))  # not square, not 32 px
    last = list(service.reconstruct(picture))[-1]
    assert [p.size for p in last.images] == [(size, size)] * 3 and last.info["tokens"] == side * side
    assert 1 <= last.info["codebook_used"] <= min(64, side * side) and math.isfinite(last.info["psnr_db"])


def test_generation_and_priming_decode_through_each_vae_kind(loaded):
    name, root, service = loaded
    _, side, size = vae_geometry(service.model.vae)
    updates = [u for u in service.text_to_image("a red circle", 1, seed=4, top_k=8) if not u.waiting]
    previews, last = updates[:-1], updates[-1]
    assert last.done and last.info["seeds"] == [4] and Image.open(last.files[0]).size == (size, size)
    shown = [p for p in previews if p.images]  # the rest are progress updates whose preview the throttle skipped
    assert shown and all(p.images[0].size == (size, size) for p in shown)
    source = Image.open(last.files[0])
    primed = [u for u in service.prime_image(source, "a red circle", keep_rows=side // 2, num_images=1, seed=5,
                                             top_k=8) if not u.waiting]
    assert primed[0].progress_text == "kept part" and primed[0].images[0].size == (size, size)
    assert primed[-1].done and Image.open(primed[-1].files[0]).size == (size, size)
