"""Per-layer codec choice: the first and last layers at a higher precision than the middle ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import Codec, Store

# the codecs a layer may use, by short name, with fixed parameters (keeps the search space small)
LAYER_CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp16": ("fp16", {}),
    "fp8": ("fp8", {"fmt": "e4m3", "scale": "head"}),
    "int8": ("int8", {"group_size": 64}),
    "kivi4": ("kivi", {"bits": 4, "group_size": 32, "residual": 128}),
    "kivi2": ("kivi", {"bits": 2, "group_size": 32, "residual": 128}),
}


def _codec(short: str) -> Codec:
    from kvtune.strategies import build

    method, params = LAYER_CODECS[short]
    return build("codec", method, params)  # type: ignore[return-value]


@dataclass
class Mixed(Codec):
    """``edge`` codec for the first and last ``edge_layers`` layers, ``middle`` codec for the others.

    Mechanism: quantization error hurts most where a layer's attention is diffuse or its output feeds the
    logits directly; the first and last layers are the usual suspects, so they keep more bits. Reference: the
    layer-wise precision of KVQuant (Hooper et al., NeurIPS 2024, which keeps the first layer's keys in higher
    precision) and of KVTuner (Li et al., ICML 2025, layer-wise mixed precision searched offline).
    Deviations: a fixed edge/middle split instead of KVTuner's searched per-layer assignment; each layer's
    store is exactly that codec's (bytes are the sum over layers). Callers that ask for one store without a
    layer (:meth:`new_store`) get the *middle* codec's; use :meth:`layer_store` / :meth:`layer_nbytes`.
    Parameters: ``edge`` and ``middle`` each one of fp16|fp8|int8|kivi4|kivi2; ``edge_layers`` 0..16.
    """

    name: ClassVar[str] = "mixed"
    citation: ClassVar[str] = ("layer-wise precision as in KVQuant (Hooper et al., NeurIPS 2024) and KVTuner "
                               "(Li et al., ICML 2025)")
    summary: ClassVar[str] = "higher precision on the first/last layers, another codec in between"

    edge: str = "int8"
    middle: str = "kivi2"
    edge_layers: int = 2

    def __post_init__(self) -> None:
        for field_name in ("edge", "middle"):
            if getattr(self, field_name) not in LAYER_CODECS:
                raise ValueError(f"{field_name} must be one of {', '.join(LAYER_CODECS)}, got {getattr(self, field_name)!r}")
        if isinstance(self.edge_layers, bool) or not isinstance(self.edge_layers, int) or not 0 <= self.edge_layers <= 16:
            raise ValueError(f"edge_layers must be an int in 0..16, got {self.edge_layers!r}")

    def layer_codec(self, layer_idx: int, num_layers: int) -> Codec:
        at_edge = layer_idx < self.edge_layers or layer_idx >= num_layers - self.edge_layers
        return _codec(self.edge if at_edge else self.middle)

    def new_store(self) -> Store:
        return _codec(self.middle).new_store()

    def layer_store(self, layer_idx: int, num_layers: int) -> Store:
        return self.layer_codec(layer_idx, num_layers).new_store()

    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return _codec(self.middle).analytic_nbytes(batch, heads, tokens, head_dim, dtype)

    def layer_nbytes(self, layer_idx: int, num_layers: int, batch: int, heads: int, tokens: int, head_dim: int,
                     dtype: torch.dtype) -> int:
        return self.layer_codec(layer_idx, num_layers).analytic_nbytes(batch, heads, tokens, head_dim, dtype)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "edge": trial.suggest_categorical("mixed.edge", ["fp16", "int8"]),
            "middle": trial.suggest_categorical("mixed.middle", ["kivi2", "kivi4"]),
            "edge_layers": trial.suggest_categorical("mixed.edge_layers", [1, 2]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "edge {fp16, int8}, middle {kivi2, kivi4}, edge_layers {1, 2}"
