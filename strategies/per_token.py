"""A store for codecs that encode each token on its own (int8 per token, fp8): shared by both.

Per-token codes can be appended and cut exactly (no requantization). The decoded view attention reads is
memoized and extended on append, so each forward dequantizes only the new tokens; ``nbytes()`` counts the
encoded tensors alone (the decoded view is a working buffer, as a kernel's registers would be).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kvtune.kernels.quant import concat_tokens
from kvtune.strategies.base import Store


class PerTokenStore(Store):
    working_buffers = ("_view",)

    def __init__(self, encode: Callable[[torch.Tensor], Any], decode: Callable[[Any], torch.Tensor]) -> None:
        self._encode, self._decode = encode, decode
        self.k: Any = None  # QuantizedTensor / Fp8Tensor (B, H, N, D)
        self.v: Any = None
        self.tokens = 0
        self._view: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        kq, vq = self._encode(keys), self._encode(values)
        self.k = kq if self.k is None else concat_tokens([self.k, kq])
        self.v = vq if self.v is None else concat_tokens([self.v, vq])
        self.tokens += keys.shape[-2]
        if self._view is not None:
            self._view = (torch.cat([self._view[0], self._decode(kq)], dim=-2),
                          torch.cat([self._view[1], self._decode(vq)], dim=-2))

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._view is None:
            self._view = (self._decode(self.k), self._decode(self.v))
        return self._view

    def keep(self, idx: torch.Tensor) -> None:
        self.k = self.k.index_select_tokens(idx)
        self.v = self.v.index_select_tokens(idx)
        self.tokens = idx.shape[-1]
        self._view = None

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()

    def __len__(self) -> int:
        return self.tokens
