"""Model shapes that decide KV-cache size: layers, KV heads, head dim, dtype.

``ModelSpec`` is what cost measurement and capacity planning need about a model; no weights are involved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def kv_bytes_per_token(self, bytes_per_element: float | None = None) -> float:
        """Uncompressed K+V bytes per token over all layers: ``2 * layers * kv_heads * head_dim * bytes``."""
        per = self.dtype_bytes if bytes_per_element is None else bytes_per_element
        return 2 * self.layers * self.kv_heads * self.head_dim * per

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
