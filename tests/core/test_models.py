"""--model resolution: GGUF file, Hugging Face folder, cached hub id; clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from kvtune.errors import UserError
from kvtune.models import _converted_path, default_model_path, load_model, resolve_model


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
