"""The uncompressed cache (fp16 / bf16): the baseline every other codec is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import Codec, Store, tensor_bytes


class PlainStore(Store):
    """Keys and values kept as given (B, H, N, D)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.tokens = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.k = keys if self.k is None else torch.cat([self.k, keys], dim=-2)
        self.v = values if self.v is None else torch.cat([self.v, values], dim=-2)
        self.tokens += keys.shape[-2]

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.k is not None and self.v is not None, "decoded() before any append"
        return self.k, self.v

    def keep(self, idx: torch.Tensor) -> None:
        assert self.k is not None and self.v is not None
        gather = idx.unsqueeze(-1).expand(*idx.shape, self.k.shape[-1])  # (B, H, K, D)
        self.k = self.k.gather(2, gather)
        self.v = self.v.gather(2, gather)
        self.tokens = idx.shape[-1]

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v)

    def __len__(self) -> int:
        return self.tokens


@dataclass
class FP16(Codec):
    """Store keys and values uncompressed, in the model's KV dtype (fp16 here; float32 on the CPU eval path)."""

    name: ClassVar[str] = "fp16"
    citation: ClassVar[str] = "baseline"
    summary: ClassVar[str] = "uncompressed (the full cache)"
    lossless: ClassVar[bool] = True

    def new_store(self) -> Store:
        return PlainStore()

    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * batch * heads * tokens * head_dim * torch.finfo(dtype).bits // 8

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {}


@dataclass
class BF16(FP16):
    """Uncompressed for a bfloat16 deployment: identical storage, named so exports pick bf16."""

    name: ClassVar[str] = "bf16"
    summary: ClassVar[str] = "uncompressed, bfloat16 deployment"
