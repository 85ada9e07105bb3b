"""Model references, allowed roots and the catalog."""

import pytest

from dalle_app.manager import BUILTIN_MODEL_NAME, Catalog, ModelLoadError, parse_reference
from dalle_app.manager.references import MODEL_DIRS_ENV, default_allowed_roots


@pytest.mark.parametrize("text, repo, path, revision", [
    ("owner/name", "owner/name", None, None),
    ("owner/name:dalle.pt", "owner/name", "dalle.pt", None),
    ("owner/name:sub/dir/model.safetensors", "owner/name", "sub/dir/model.safetensors", None),
    ("owner/name@v1.0", "owner/name", None, "v1.0"),
    ("owner/name@refs/pr/3", "owner/name", None, "refs/pr/3"),
    ("owner/name:ckpt/dalle.pt@0123456789abcdef0123456789abcdef01234567", "owner/name", "ckpt/dalle.pt",
     "0123456789abcdef0123456789abcdef01234567"),
    ("hf://owner/my.model-v2", "owner/my.model-v2", None, None),
])
def test_hub_references(text, repo, path, revision):
    ref = parse_reference(text, allowed_roots=[])
    assert (ref.kind, ref.repo_id, ref.path_in_repo, ref.revision) == ("hub", repo, path, revision)
    assert parse_reference(str(ref), allowed_roots=[]) == ref  # str() gives back a reference that parses the same


@pytest.mark.parametrize("text", ["", "just-a-name", "a/b/c", "owner/name:../secret", "owner/name@a@b"])
def test_bad_references_are_one_sentence(text):
    with pytest.raises(ModelLoadError) as err:
        parse_reference(text, allowed_roots=[])
    message = str(err.value)
    assert message.endswith(".") and "\n" not in message


def test_local_paths_inside_allowed_roots(tmp_path):
    model_dir = tmp_path / "models" / "mine"
    model_dir.mkdir(parents=True)
    ckpt = model_dir / "dalle.pt"
    ckpt.write_bytes(b"x")
    ref = parse_reference(str(ckpt), allowed_roots=[tmp_path / "models"])
    assert ref.kind == "local" and ref.path == ckpt.resolve()
    ref = parse_reference(str(model_dir), allowed_roots=[tmp_path / "models"])
    assert ref.kind == "local" and ref.path == model_dir.resolve()


def test_local_path_outside_roots_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "dalle.pt"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=MODEL_DIRS_ENV) as err:
        parse_reference(str(outside), allowed_roots=[tmp_path / "models"])
    assert "outside the allowed model folders" in str(err.value)
    # a symlink inside a root that points outside is refused too
    (tmp_path / "models").mkdir()
    link = tmp_path / "models" / "link.pt"
    link.symlink_to(outside)
    with pytest.raises(ModelLoadError, match="outside"):
        parse_reference(str(link), allowed_roots=[tmp_path / "models"])


def test_env_adds_allowed_roots(tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_DIRS_ENV, f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    roots = default_allowed_roots()
    assert tmp_path / "a" in roots and tmp_path / "b" in roots
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "m.safetensors").write_bytes(b"x")
    assert parse_reference(str(tmp_path / "b" / "m.safetensors")).kind == "local"


def test_missing_and_wrong_local_files(tmp_path):
    with pytest.raises(ModelLoadError, match="No file or folder"):
        parse_reference(str(tmp_path / "nothing.pt"), allowed_roots=[tmp_path])
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="not a model file"):
        parse_reference(str(tmp_path / "notes.txt"), allowed_roots=[tmp_path])


def test_existing_local_folder_wins_over_hub_reading(tmp_path, monkeypatch):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_reference("owner/name", allowed_roots=[tmp_path]).kind == "local"
    assert parse_reference("hf://owner/name", allowed_roots=[tmp_path]).kind == "hub"


def test_catalog_builtin_first_and_persisted(tmp_path):
    path = tmp_path / "catalog.json"
    catalog = Catalog(path, allowed_roots=[tmp_path])
    assert catalog.names() == [BUILTIN_MODEL_NAME]
    catalog.add("someone/dalle-cc12m@v2", name="cc12m", description="community model")
    catalog.add("someone/other")
    again = Catalog(path, allowed_roots=[tmp_path])
    assert again.names() == [BUILTIN_MODEL_NAME, "cc12m", "someone/other"]
    assert again.get("cc12m") == "someone/dalle-cc12m@v2"
    assert again.get("not/in-catalog") == "not/in-catalog"
    again.remove("cc12m")
    assert Catalog(path).names() == [BUILTIN_MODEL_NAME, "someone/other"]
    with pytest.raises(ModelLoadError):
        again.add("someone/x", name=BUILTIN_MODEL_NAME)
    with pytest.raises(ModelLoadError):
        again.add(str(tmp_path.parent / "outside.pt"))
