"""int8: asymmetric 8-bit per-token quantization of keys and values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.kernels.quant import dequantize_int, int_nbytes, quantize_int
from kvtune.strategies.base import Codec, Store
from kvtune.strategies.per_token import PerTokenStore


@dataclass
class Int8(Codec):
    """Asymmetric int8 codes, one (scale, zero) per ``group_size`` channels of each token, for K and V.

    Mechanism: per token and group, scale = (max - min) / 255 and zero = min, stored in the KV dtype.
    Reference: the per-token int8 KV cache of serving stacks (e.g. LMDeploy, TensorRT-LLM int8 KV); with one
    group per head it is their per-token-per-head scheme. Deviations: asymmetric (scale + zero) rather than
    symmetric, which costs one more scale per group and halves the worst-case error on skewed channels.
    Parameters: ``group_size`` in {32, 64, 128} channels (capped at head_dim).
    """

    name: ClassVar[str] = "int8"
    citation: ClassVar[str] = "per-token int8 KV cache (as in LMDeploy / TensorRT-LLM int8 KV)"
    summary: ClassVar[str] = "8-bit asymmetric, per token, grouped channels"

    group_size: int = 64

    def __post_init__(self) -> None:
        if self.group_size not in (16, 32, 64, 128):
            raise ValueError(f"group_size must be one of 16, 32, 64, 128, got {self.group_size}")

    def new_store(self) -> Store:
        group = self.group_size
        return PerTokenStore(
            lambda x: quantize_int(x, bits=8, group_size=min(group, x.shape[-1]), axis="channel"), dequantize_int)

    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        g = min(self.group_size, head_dim)
        return 2 * int_nbytes((batch, heads, tokens, head_dim), 8, g, "channel", dtype)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {"group_size": trial.suggest_categorical("int8.group_size", [32, 64, 128])}

    @classmethod
    def search_space_doc(cls) -> str:
        return "group_size {32, 64, 128}"
