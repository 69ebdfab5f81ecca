"""--model resolution: GGUF file, Hugging Face folder, cached hub id; clear errors otherwise."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from kvtune.errors import UserError
from kvtune.models import _converted_path, default_model_path, file_sha256, load_model, model_identity, resolve_model


def test_default_is_the_bundled_gguf():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    source, kwargs = resolve_model(None)
    assert kwargs["gguf_file"] == path.name


def test_hf_folder_loads_the_same_weights(smol):
    """The GGUF conversion cache is a plain Hugging Face folder; loading it as --model gives the same logits."""
    folder = _converted_path(default_model_path())
    if not (folder / "config.json").is_file():
        pytest.skip("conversion cache not written (read-only home?)")
    other = load_model(str(folder))
    ids = smol.tokenizer("Key-value caches grow with context", return_tensors="pt").input_ids
    assert other.spec == smol.spec.__class__(**{**smol.spec.__dict__, "name": other.spec.name})
    assert torch.equal(other.model(ids).logits, smol.model(ids).logits)


@pytest.mark.parametrize("arg, fragment", [
    ("/no/such/model.gguf", "no such GGUF file"),
    ("no-such-org/no-such-model", "not in the local Hugging Face cache"),
    ("./definitely-missing", "no such file, folder or cached hub id"),
])
def test_bad_model_arguments(arg, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_model(arg)


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_model_identity_follows_content_not_path(tmp_path, monkeypatch):
    """A study's fingerprint holds the model's identity: a copy elsewhere is the same model, other bytes are not."""
    monkeypatch.setenv("KVTUNE_CACHE_DIR", str(tmp_path / "cache"))
    here = tmp_path / "a" / "m.gguf"
    here.parent.mkdir()
    here.write_bytes(b"weights" * 1000)
    there = tmp_path / "b" / "m.gguf"
    there.parent.mkdir()
    shutil.copy(here, there)
    expected = hashlib.sha256(b"weights" * 1000).hexdigest()
    assert file_sha256(here) == expected
    assert model_identity(str(here)) == model_identity(str(there)) == f"m.gguf sha256:{expected[:16]}"
    there.write_bytes(b"other" * 1000)
    assert model_identity(str(there)) != model_identity(str(here))


def test_model_identity_of_a_folder_hashes_config_and_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTUNE_CACHE_DIR", str(tmp_path / "cache"))
    folders = []
    for name in ("x", "y"):
        folder = tmp_path / name / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"a": 1}')
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
        (folder / "README.md").write_text(name)  # not part of the model
        folders.append(folder)
    assert model_identity(str(folders[0])) == model_identity(str(folders[1]))
    (folders[1] / "config.json").write_text('{"a": 2}')
    assert model_identity(str(folders[0])) != model_identity(str(folders[1]))


def test_file_hash_is_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTUNE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    first = file_sha256(f)
    calls = []
    real_open = type(f).open
    monkeypatch.setattr(type(f), "open", lambda self, *a, **k: calls.append(self) or real_open(self, *a, **k))
    assert file_sha256(f) == first and f not in calls, "the second call reads the memo, not the file"
    f.write_bytes(b"abcd")  # a new size and mtime: read again
    calls.clear()
    assert file_sha256(f) == hashlib.sha256(b"abcd").hexdigest() and calls.count(f) == 1
