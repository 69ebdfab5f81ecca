"""Model shapes that decide KV-cache size: layers, KV heads, head dim, dtype.

``ModelSpec`` is what cost measurement and capacity planning need about a model; no weights are involved.
Specs come from a transformers config (:meth:`ModelSpec.from_hf_config`), a local ``config.json``
(:meth:`ModelSpec.from_config_json`), a GGUF header (:meth:`ModelSpec.from_gguf`) or a built-in preset
(:func:`preset`, :data:`PRESETS`).

Two layouts need more than ``2 * layers * kv_heads * head_dim``:

* **sliding-window layers** (Gemma-2, Mistral-7B-v0.1): such a layer never holds more than ``sliding_window``
  tokens, so the cache of a long sequence is smaller than the per-token figure times its length
  (:meth:`ModelSpec.kv_bytes_at`).
* **multi-head latent attention** (DeepSeek-V2/V3): each layer caches one compressed latent of
  ``kv_lora_rank`` values plus a ``qk_rope_head_dim`` positional key, shared by K and V. Such a spec is
  written in its weight-absorbed decode form: one KV head whose head dim is ``kv_lora_rank + qk_rope_head_dim``,
  and ``kv_bytes_per_token`` counts that latent once instead of K and V separately.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvtune.errors import UserError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int  # decoder layers that hold a KV cache
    kv_heads: int  # key/value heads per layer (GQA: fewer than q_heads)
    q_heads: int  # query heads per layer
    head_dim: int
    dtype: str = "float16"  # KV dtype of the target deployment
    sliding_window: int | None = None  # tokens, for layers that use one
    layer_types: tuple[str, ...] = field(default=())  # per layer: "full_attention" / "sliding_attention"
    # -- added for profiling / capacity planning; all optional so existing constructors keep working --
    kv_lora_rank: int | None = None  # MLA: latent width cached per layer (K and V share it)
    qk_rope_head_dim: int | None = None  # MLA: decoupled positional key cached beside the latent
    params: int | None = None  # parameter count (weights), when known
    weight_bytes: int | None = None  # bytes the weights occupy as deployed (e.g. from a GGUF), when known
    source: str = ""  # where the shape came from: "preset", a config.json path, a GGUF path

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    def kv_bytes_per_token(self, bytes_per_element: float | None = None) -> float:
        """Uncompressed K+V bytes per token over all layers: ``2 * layers * kv_heads * head_dim * bytes``.

        For an MLA spec the cached latent is counted once: ``layers * (kv_lora_rank + qk_rope_head_dim) * bytes``.
        Sliding windows are ignored here (this is the per-token rate below the window); see :meth:`kv_bytes_at`.
        """
        per = self.dtype_bytes if bytes_per_element is None else bytes_per_element
        if self.is_mla:
            return self.layers * (self.kv_lora_rank + (self.qk_rope_head_dim or 0)) * per
        return 2 * self.layers * self.kv_heads * self.head_dim * per

    def sliding_layers(self) -> int:
        """How many layers keep only the last ``sliding_window`` tokens."""
        if not self.sliding_window:
            return 0
        if self.layer_types:
            return sum(1 for t in self.layer_types[: self.layers] if t == "sliding_attention")
        return self.layers  # a window with no per-layer types applies to every layer (Mistral-7B-v0.1)

    def kv_bytes_at(self, context_tokens: int, bytes_per_token: float | None = None) -> float:
        """KV bytes one sequence of ``context_tokens`` holds, with sliding-window layers capped at the window.

        ``bytes_per_token`` is the all-layer rate of the codec in use (default: this spec's dtype); it is
        split evenly across layers, which holds for every codec kvtune knows (same codec on every layer).
        """
        rate = self.kv_bytes_per_token() if bytes_per_token is None else bytes_per_token
        sliding = self.sliding_layers()
        if sliding == 0:
            return rate * context_tokens
        per_layer = rate / self.layers
        full = self.layers - sliding
        return per_layer * (full * context_tokens + sliding * min(context_tokens, int(self.sliding_window)))

    def weights_bytes(self, bytes_per_param: float = 2.0) -> int | None:
        """Bytes of the weights: the measured size when known, else ``params * bytes_per_param``."""
        if self.weight_bytes is not None:
            return self.weight_bytes
        if self.params is not None:
            return int(self.params * bytes_per_param)
        return None

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None, dtype: str = "float16") -> "ModelSpec":
        """From a transformers ``PretrainedConfig`` (or the dict of a ``config.json``)."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        q_heads = int(get("num_attention_heads"))
        kv_heads = int(get("num_key_value_heads") or q_heads)
        hidden = int(get("hidden_size"))
        head_dim = int(get("head_dim") or hidden // q_heads)
        layer_types = tuple(get("layer_types") or ())
        return cls(
            name=name or str(get("_name_or_path") or get("model_type") or "model"),
            layers=int(get("num_hidden_layers")),
            kv_heads=kv_heads,
            q_heads=q_heads,
            head_dim=head_dim,
            dtype=dtype,
            sliding_window=get("sliding_window"),
            layer_types=layer_types,
        )

    @classmethod
    def from_config_json(cls, path: str | os.PathLike[str], dtype: str = "float16") -> "ModelSpec":
        """From a local ``config.json`` (or a folder holding one); no weights are read.

        Unlike :meth:`from_hf_config` this understands MLA configs (``kv_lora_rank``), multimodal configs whose
        language model sits under ``text_config``, ``use_sliding_window: false`` (Qwen2), and Gemma-2's
        alternating layers; it also estimates the parameter count for capacity planning.
        """
        source = Path(path)
        if source.is_dir():
            source = source / "config.json"
        if not source.is_file():
            raise UserError(f"{source}: no such config.json")
        try:
            raw = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{source}: not a readable JSON config ({exc})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{source}: expected a JSON object")
        cfg = raw
        if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "_name_or_path": raw.get("_name_or_path")}
        missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size") if cfg.get(k) is None]
        if missing:
            raise UserError(f"{source}: not a decoder config (missing {', '.join(missing)})")
        name = str(cfg.get("_name_or_path") or source.parent.name or cfg.get("model_type") or "model")
        try:
            return _spec_from_config_dict(cfg, name=name, dtype=dtype, source=str(source))
        except (TypeError, ValueError) as exc:
            raise UserError(f"{source}: unexpected value in config ({exc})") from None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], dtype: str = "float16") -> "ModelSpec":
        """From a GGUF file's header (metadata keys ``<arch>.block_count``, ``<arch>.attention.*``).

        The tensors are not loaded; their sizes are summed from the tensor table into ``weight_bytes``.
        """
        source = Path(path)
        if not source.is_file():
            raise UserError(f"{source}: no such GGUF file")
        try:
            import gguf  # deferred: only GGUF users pay for the import
        except ImportError:  # pragma: no cover - gguf is a dependency
            raise UserError("reading GGUF needs the 'gguf' package: pip install gguf") from None
        try:
            reader = gguf.GGUFReader(str(source), "r")
        except Exception as exc:  # noqa: BLE001 - the reader raises bare ValueError/struct errors on junk
            raise UserError(f"{source}: not a readable GGUF file ({exc})") from None

        def field_value(key: str) -> Any:
            f = reader.fields.get(key)
            if f is None:
                return None
            return f.contents()

        arch = field_value("general.architecture")
        if not arch:
            raise UserError(f"{source}: GGUF header has no general.architecture")
        layers = field_value(f"{arch}.block_count")
        q_heads = field_value(f"{arch}.attention.head_count")
        if layers is None or q_heads is None:
            raise UserError(f"{source}: GGUF header lacks {arch}.block_count or {arch}.attention.head_count")
        kv_heads = field_value(f"{arch}.attention.head_count_kv")
        if isinstance(q_heads, list):  # some archs store one value per layer
            q_heads = max(q_heads)
        if isinstance(kv_heads, list):
            kv_heads = max(kv_heads) if kv_heads else None
        kv_heads = int(kv_heads or q_heads)
        embed = field_value(f"{arch}.embedding_length")
        head_dim = field_value(f"{arch}.attention.key_length")
        if head_dim is None:
            if embed is None:
                raise UserError(f"{source}: GGUF header lacks {arch}.embedding_length and key_length")
            head_dim = int(embed) // int(q_heads)
        window = field_value(f"{arch}.attention.sliding_window")
        kv_lora = field_value(f"{arch}.attention.kv_lora_rank")
        rope_dim = field_value(f"{arch}.rope.dimension_count")
        params = None
        weight_bytes = sum(int(t.n_bytes) for t in reader.tensors) or None
        if reader.tensors:
            params = sum(int(t.n_elements) for t in reader.tensors)
        name = str(field_value("general.name") or source.stem)
        layer_types: tuple[str, ...] = ()
        if window and arch in ("gemma2", "gemma3"):
            # llama.cpp's gemma2 alternates sliding / global layers starting with a sliding one.
            layer_types = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(int(layers)))
        if kv_lora:
            return cls(name=name, layers=int(layers), kv_heads=1, q_heads=int(q_heads),
                       head_dim=int(kv_lora) + int(rope_dim or 0), dtype=dtype, kv_lora_rank=int(kv_lora),
                       qk_rope_head_dim=int(rope_dim or 0), params=params, weight_bytes=weight_bytes,
                       source=str(source))
        return cls(name=name, layers=int(layers), kv_heads=kv_heads, q_heads=int(q_heads), head_dim=int(head_dim),
                   dtype=dtype, sliding_window=int(window) if window else None, layer_types=layer_types,
                   params=params, weight_bytes=weight_bytes, source=str(source))


def _estimate_params(cfg: dict[str, Any], layers: int, q_heads: int, kv_heads: int, head_dim: int) -> int | None:
    """Parameter count from a dense/MoE decoder config: embeddings, attention, MLP (experts included), norms.

    An estimate (biases and model-specific extras are ignored); within ~2% for Llama/Qwen/Mistral/Mixtral.
    """
    hidden = int(cfg["hidden_size"])
    vocab = cfg.get("vocab_size")
    inter = cfg.get("intermediate_size")
    if vocab is None or inter is None:
        return None
    embed = int(vocab) * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    if cfg.get("kv_lora_rank"):
        r, q_r = int(cfg["kv_lora_rank"]), cfg.get("q_lora_rank")
        nope, rope, v = int(cfg.get("qk_nope_head_dim", 128)), int(cfg.get("qk_rope_head_dim", 64)), int(
            cfg.get("v_head_dim", 128))
        q_proj = (hidden * int(q_r) + int(q_r) * q_heads * (nope + rope)) if q_r else hidden * q_heads * (nope + rope)
        attn = q_proj + hidden * (r + rope) + r * q_heads * (nope + v) + q_heads * v * hidden
    else:
        attn = hidden * q_heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    experts = int(cfg.get("num_local_experts") or cfg.get("n_routed_experts") or cfg.get("num_experts") or 0)
    moe_inter = int(cfg.get("moe_intermediate_size") or inter)
    shared = int(cfg.get("n_shared_experts") or 0)
    dense_layers = int(cfg.get("first_k_dense_replace") or 0) if experts else layers
    moe_layers = layers - dense_layers if experts else 0
    mlp = dense_layers * 3 * hidden * int(inter) + moe_layers * (
        3 * hidden * moe_inter * (experts + shared) + hidden * experts)
    return embed + layers * (attn + 2 * hidden) + mlp + hidden


def _spec_from_config_dict(cfg: dict[str, Any], *, name: str, dtype: str, source: str) -> ModelSpec:
    q_heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or q_heads)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // q_heads)
    layers = int(cfg["num_hidden_layers"])
    params = _estimate_params(cfg, layers, q_heads, kv_heads, head_dim)
    if cfg.get("kv_lora_rank"):
        r, rope = int(cfg["kv_lora_rank"]), int(cfg.get("qk_rope_head_dim") or 0)
        return ModelSpec(name=name, layers=layers, kv_heads=1, q_heads=q_heads, head_dim=r + rope, dtype=dtype,
                         kv_lora_rank=r, qk_rope_head_dim=rope, params=params, source=source)
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:
        window = None
    layer_types = tuple(cfg.get("layer_types") or ())
    if window and not layer_types and cfg.get("model_type") == "gemma2":
        # Gemma-2 configs predating ``layer_types``: even layers slide, odd layers are global.
        layer_types = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers))
    if window and layer_types and "sliding_attention" not in layer_types:
        window = None  # a window with every layer global is never used
    return ModelSpec(name=name, layers=layers, kv_heads=kv_heads, q_heads=q_heads, head_dim=head_dim, dtype=dtype,
                     sliding_window=int(window) if window else None, layer_types=layer_types, params=params,
                     source=source)


def _alternating(layers: int) -> tuple[str, ...]:
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers))


# Shapes from each model's published config.json on the Hugging Face Hub; parameter counts from the model
# cards. Weights are deployed in bf16 (2 bytes/param) except DeepSeek-V3, released with fp8 weights.
PRESETS: dict[str, ModelSpec] = {
    s.name.lower(): s
    for s in (
        ModelSpec("Llama-3.1-8B", 32, 8, 32, 128, params=8_030_000_000, source="preset"),
        ModelSpec("Llama-3.1-70B", 80, 8, 64, 128, params=70_600_000_000, source="preset"),
        ModelSpec("Llama-3.1-405B", 126, 8, 128, 128, params=405_900_000_000, source="preset"),
        ModelSpec("Llama-2-7B", 32, 32, 32, 128, params=6_740_000_000, source="preset"),
        ModelSpec("Qwen2.5-7B", 28, 4, 28, 128, params=7_620_000_000, source="preset"),
        ModelSpec("Qwen2.5-72B", 80, 8, 64, 128, params=72_700_000_000, source="preset"),
        ModelSpec("Mistral-7B", 32, 8, 32, 128, params=7_250_000_000, source="preset"),
        ModelSpec("Mixtral-8x7B", 32, 8, 32, 128, params=46_700_000_000, source="preset"),
        ModelSpec("Gemma-2-9B", 42, 8, 16, 256, sliding_window=4096, layer_types=_alternating(42),
                  params=9_240_000_000, source="preset"),
        ModelSpec("DeepSeek-V3", 61, 1, 128, 576, dtype="bfloat16", kv_lora_rank=512, qk_rope_head_dim=64,
                  params=671_000_000_000, weight_bytes=671_000_000_000, source="preset"),
        ModelSpec("SmolLM2-135M", 30, 3, 9, 64, params=134_500_000, source="preset"),
    )
}


def _norm(name: str) -> str:
    return name.strip().lower().split("/")[-1].removesuffix("-instruct").removesuffix("-hf")


def preset(name: str) -> ModelSpec:
    """A built-in model spec by name (case-insensitive; ``org/`` prefixes and ``-Instruct`` are ignored)."""
    key = _norm(name)
    for k, spec in PRESETS.items():
        if _norm(k) == key:
            return spec
    raise UserError(f"unknown model '{name}' (presets: {', '.join(s.name for s in PRESETS.values())}; "
                    "or pass a config.json, a model folder or a .gguf file)")


def resolve_model(name_or_path: str, dtype: str | None = None) -> ModelSpec:
    """A preset name, a folder with ``config.json``, a ``config.json`` file, or a ``.gguf`` file."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".json":
            spec = ModelSpec.from_config_json(path)
        elif path.suffix.lower() == ".gguf":
            spec = ModelSpec.from_gguf(path)
        else:
            raise UserError(f"{path}: expected a config.json, a model folder or a .gguf file")
    else:
        spec = preset(name_or_path)
    return replace(spec, dtype=dtype) if dtype else spec
