"""`python -m dalle_app reconstruct` and `complete` (through dalle_app.__main__.main, as the command runs them)."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("youtokentome")

from dalle_app.__main__ import main
from dalle_app.service import read_parameters

from app_factory import make_tiny_model

DEVICE = ["--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_tiny_model(root / "model")


@pytest.fixture(autouse=True)
def allowed(model, monkeypatch):
    """The CLI's manager takes its allowed folders from the environment, as a user's shell would set them."""
    monkeypatch.setenv("DALLE_APP_MODEL_DIRS", str(model.parent))


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_reconstruct_writes_the_three_pngs_with_their_parameters(model, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(picture)
    out = tmp_path / "outputs"
    code, stdout, stderr = _run(capsys, "reconstruct", "--model", str(model), str(picture), "--out", str(out), *DEVICE)
    assert code == 0, stderr
    files = stdout.split()
    assert len(files) == 3 and all(Path(f).parent == out and Path(f).is_file() for f in files)
    assert [Path(f).name.rsplit("-", 1)[1] for f in files] == ["input.png", "reconstruction.png", "token_grid.png"]
    for path in files:
        params = read_parameters(path)
        assert (params["app"], params["kind"], params["prompt"], params["seed"]) == ("dalle_app", "reconstruct", "",
                                                                                      None)
        assert params["model"] == str(model.resolve())
        assert params["settings"]["part"] == ["input", "reconstruction", "token_grid"]
        assert Image.open(path).size == (32, 32)
    info = json.loads(stderr.strip().splitlines()[-1])
    assert info["image_size"] == 32 and info["tokens"] == 64 and math.isfinite(info["psnr_db"])
    assert 1 <= info["codebook_used"] <= info["codebook_size"] == 64


def test_reconstruct_of_a_missing_picture_fails_in_one_sentence(model, tmp_path, capsys):
    code, stdout, stderr = _run(capsys, "reconstruct", "--model", str(model), str(tmp_path / "nope.png"),
                                "--out", str(tmp_path / "outputs"), *DEVICE)
    assert code == 1 and not stdout and stderr.startswith("error: The image could not be read")
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr


def test_generate_uses_the_models_recommended_sampling_unless_told(model, tmp_path, capsys):
    config_file = model / "config.json"
    original = config_file.read_text()
    config = json.loads(original)
    config.setdefault("source", {})["recommended_sampling"] = {"cond_scale": 2.5, "top_k": 24, "temperature": 0.7}
    config_file.write_text(json.dumps(config))
    try:
        common = ["generate", "--model", str(model), "--prompt", "a red circle", "-n", "1", "--seed", "3",
                  "--out", str(tmp_path / "outputs"), *DEVICE]
        code, stdout, stderr = _run(capsys, *common)
        assert code == 0, stderr
        settings = read_parameters(stdout.split()[0])["settings"]
        assert (settings["cond_scale"], settings["top_k"], settings["temperature"]) == (2.5, 24, 0.7)
        code, stdout, stderr = _run(capsys, *common, "--cond-scale", "1", "--top-k", "7", "--temperature", "1.2")
        assert code == 0, stderr
        settings = read_parameters(stdout.split()[0])["settings"]
        assert (settings["cond_scale"], settings["top_k"], settings["temperature"]) == (1.0, 7, 1.2)
    finally:
        config_file.write_text(original)  # the module's other tests share this model


def test_complete_prints_completions_of_the_prefix_that_follow_the_seed(model, capsys):
    args = ["complete", "--model", str(model), "--prompt", "a small red", "-n", "3", "--seed", "7", *DEVICE]
    code, stdout, stderr = _run(capsys, *args)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("a small red") for line in lines), lines
    assert all(len(line) > len("a small red") for line in lines) and len(set(lines)) > 1, lines  # really sampled
    info = json.loads(stderr.strip().splitlines()[-1])
    assert info["seeds"] == [7, 8, 9] and info["completions"] == lines
    assert _run(capsys, *args)[1].splitlines() == lines  # same seed, same completions
    second = _run(capsys, "complete", "--model", str(model), "--prompt", "a small red", "-n", "1", "--seed", "8",
                  *DEVICE)[1]
    assert second.splitlines() == [lines[1]]  # each completion depends on its own seed only
