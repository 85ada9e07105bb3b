"""What the service reads and writes: uploads of any bit depth, and the retention of its output folder."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("youtokentome")

from dalle_app.manager import ModelManager
from dalle_app.outputs import OutputFolder, Retention
from dalle_app.service import Service, read_parameters

from app_factory import make_tiny_model


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_files")
    make_tiny_model(root / "model")
    return root


@pytest.fixture(scope="module")
def manager(model_root):
    return ModelManager(device="cpu", dtype="fp32", allowed_roots=[model_root])


@pytest.fixture(scope="module")
def service(model_root, manager):
    return Service(str(model_root / "model"), manager=manager, output_dir=model_root / "out")


def _last(updates):
    return list(updates)[-1]


# ----------------------------------------------------------------------------------------------- image modes

def _gradient(mode: str, side: int = 64):
    """A square left-to-right gradient over the full range of `mode`, as PIL holds it (16-bit, 32-bit int, float)."""
    ramp = np.linspace(0.0, 1.0, side)[None, :].repeat(side, 0)
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).round().astype(np.uint16))
    if mode == "I;16B":
        return Image.frombytes("I;16B", (side, side), (ramp * 65535).round().astype(">u2").tobytes())
    if mode == "I":  # 32-bit integers holding 16-bit values (how older Pillow versions read 16-bit PNGs)
        return Image.fromarray((ramp * 65535).round().astype(np.int32))
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32))
    raise ValueError(mode)


@pytest.mark.parametrize("mode, suffix", [("I;16", "png"), ("I;16B", "tif"), ("I", "tif"), ("F", "tif")])
def test_high_bit_depth_uploads_keep_their_gradient(service, tmp_path, mode, suffix):
    path = tmp_path / f"gradient.{suffix}"
    _gradient(mode).save(path)
    assert Image.open(path).mode == mode  # the file really holds high bit depth pixels, as an upload would
    last = _last(service.reconstruct(str(path)))  # uploads reach the service as file paths
    seen = np.asarray(last.images[0].convert("L"), dtype=np.int16)  # the input as the VAE sees it
    columns = seen.mean(axis=0)
    assert (np.diff(columns) >= 0).all() and (np.diff(columns) > 0).mean() > 0.9, columns  # still a gradient
    assert columns[0] < 10 and columns[-1] > 245, columns  # from black to white
    assert (seen >= 250).mean() < 0.1, f"{(seen >= 250).mean():.0%} of the picture is saturated"


def test_numpy_arrays_of_any_depth_are_scaled_to_eight_bits():
    from dalle_app.images import eight_bit, load_image

    ramp = np.linspace(0.0, 1.0, 11)
    expected = ramp * 255
    for values in ((ramp * 65535).round().astype(np.uint16), ramp.astype(np.float32), expected.astype(np.float32),
                   expected.round().astype(np.int64)):
        assert np.abs(eight_bit(values).astype(int) - expected).max() <= 1, values.dtype
    assert list(eight_bit(np.array([-1.0, 0.0, 1.0]))) == [0, 128, 255]  # outside every range: stretched
    assert list(eight_bit(np.array([np.nan, 0.0, 0.5, 1.0]))) == [0, 0, 128, 255]  # NaN reads as the minimum
    image = load_image((ramp[None, :, None].repeat(3, 2) * 65535).round().astype(np.uint16))
    assert [image.getpixel((x, 0))[0] for x in (0, 5, 10)] == [0, 128, 255]


# ----------------------------------------------------------------------------------------------- output retention

def _outputs(folder: Path, count: int, size: int = 1000, now: float | None = None) -> list[Path]:
    """`count` files named like the service's PNGs, the first the oldest (100 s apart, the last 100 s old)."""
    now = time.time() if now is None else now
    paths = []
    for i in range(count):
        path = folder / f"20260101-1200{i:02d}-{i:04d}abcd-text_to_image-00-seed{i}.png"
        path.write_bytes(b"x" * size)
        os.utime(path, (now - 100 * (count - i), now - 100 * (count - i)))
        paths.append(path)
    return paths


def test_retention_deletes_the_oldest_first_and_only_the_services_own_files(tmp_path):
    now = time.time()
    paths = _outputs(tmp_path, 6, now=now)
    (tmp_path / "holiday.png").write_bytes(b"x" * 5000)  # not written by the service
    (tmp_path / "examples").mkdir()
    example = tmp_path / "examples" / "20250101-000000-0000abcd-example-00.png"  # in a subfolder
    example.write_bytes(b"x")
    os.utime(example, (now - 10 ** 6, now - 10 ** 6))
    folder = OutputFolder(tmp_path, Retention(max_files=4, max_bytes=None, max_age_s=None, grace_s=0))
    assert folder.prune(now) == paths[:2] and folder.usage() == (4, 4000)
    folder.retention = Retention(max_files=None, max_bytes=2500, max_age_s=None, grace_s=0)
    assert folder.prune(now) == paths[2:4] and folder.usage() == (2, 2000)
    folder.retention = Retention(max_files=None, max_bytes=None, max_age_s=150, grace_s=0)
    assert folder.prune(now) == [paths[4]]  # 200 s old; the last one is 100 s old
    assert (tmp_path / "holiday.png").exists() and example.exists() and paths[5].exists()
    assert OutputFolder(tmp_path, None).prune(now + 10 ** 6) == []  # no retention: nothing is deleted


def test_retention_keeps_files_still_being_served_and_recent_ones(tmp_path):
    now = time.time()
    paths = _outputs(tmp_path, 5, now=now)
    folder = OutputFolder(tmp_path, Retention(max_files=1, max_bytes=None, max_age_s=None, grace_s=250))
    folder.hold([paths[0]])
    folder.hold([str(paths[0])])  # two requests serve the same file
    removed = folder.prune(now)
    assert removed == paths[1:3]  # paths[0] is held; paths[3] and paths[4] are younger than the grace period
    folder.release([paths[0]])
    assert folder.prune(now) == []  # still held by the second request
    folder.release([paths[0]])
    assert folder.prune(now) == [paths[0]]


def test_retention_limits_come_from_the_environment(monkeypatch):
    for name in ("DALLE_APP_OUTPUT_LIMIT_MB", "DALLE_APP_OUTPUT_LIMIT_FILES", "DALLE_APP_OUTPUT_MAX_AGE_H"):
        monkeypatch.delenv(name, raising=False)
    assert Retention.from_env() == Retention(max_bytes=500 * 1024 ** 2, max_files=10_000, max_age_s=24 * 3600)
    monkeypatch.setenv("DALLE_APP_OUTPUT_LIMIT_MB", "1.5")
    monkeypatch.setenv("DALLE_APP_OUTPUT_LIMIT_FILES", "0")
    monkeypatch.setenv("DALLE_APP_OUTPUT_MAX_AGE_H", "2")
    assert Retention.from_env() == Retention(max_bytes=int(1.5 * 1024 ** 2), max_files=None, max_age_s=7200)
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv("DALLE_APP_OUTPUT_LIMIT_MB", bad)
        with pytest.raises(ValueError, match="DALLE_APP_OUTPUT_LIMIT_MB must be a number") as info:
            Retention.from_env()
        assert "\n" not in str(info.value)


def test_service_output_folder_is_pruned_but_never_under_a_request_being_served(manager, model_root, tmp_path):
    reference = str(model_root / "model")
    service = Service(reference, manager=manager, output_dir=tmp_path,
                      retention=Retention(max_files=3, max_bytes=None, max_age_s=None, grace_s=0))
    picture = Image.new("RGB", (32, 32), (10, 120, 200))
    first = _last(service.reconstruct(picture)).files
    second = _last(service.reconstruct(picture)).files
    assert sorted(str(p) for p in tmp_path.iterdir()) == sorted(second)  # the first request's files are gone
    assert not any(Path(f).exists() for f in first)
    # a request whose result has not been taken yet keeps its file, whatever the limit
    serving = service.text_to_image("a red circle", 1, seed=3)
    done = next(u for u in serving if u.done)
    third = _last(service.reconstruct(picture)).files
    assert Path(done.files[0]).exists() and read_parameters(done.files[0])["seed"] == 3
    assert all(Path(f).exists() for f in third) and len(list(tmp_path.iterdir())) == 4
    serving.close()  # served: its file may go now
    fourth = _last(service.reconstruct(picture)).files
    assert sorted(str(p) for p in tmp_path.iterdir()) == sorted(fourth)


def test_service_applies_retention_to_its_own_temporary_folder_only(manager, model_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_APP_OUTPUT_LIMIT_FILES", "7")
    reference = str(model_root / "model")
    own = Service(reference, manager=manager)
    try:
        assert own.outputs.retention.max_files == 7
    finally:
        own.output_dir.rmdir()
    assert Service(reference, manager=manager, output_dir=tmp_path).outputs.retention is None  # e.g. the CLI's --out
    assert Service(reference, manager=manager, output_dir=tmp_path, retention=True).outputs.retention.max_files == 7
