"""A store for codecs that encode each token on its own (int8 per token, symmetric int8, fp8): shared by all.

Per-token codes can be appended and cut exactly (no requantization). The encoded form is any tensor type with
``index_select_tokens(idx)`` and ``nbytes()``; ``concat`` joins two of them along the token axis
(:func:`~kvtune.kernels.quant.concat_tokens` for ``QuantizedTensor`` / ``Fp8Tensor``, the default). The decoded view attention reads is
memoized and extended on append, so each forward dequantizes only the new tokens; ``nbytes()`` counts the
encoded tensors alone (the decoded view is a working buffer, as a kernel's registers would be).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kvtune.kernels.quant import concat_tokens
from kvtune.strategies.base import Store, TokenView


class PerTokenStore(Store):
    working_buffers = ("_view",)

    def __init__(self, encode: Callable[[torch.Tensor], Any], decode: Callable[[Any], torch.Tensor],
                 concat: Callable[[list[Any]], Any] = concat_tokens) -> None:
        self._encode, self._decode, self._concat = encode, decode, concat
        self.k: Any = None  # the encoded (B, H, N, D): QuantizedTensor, Fp8Tensor, SymmetricInt8Tensor
        self.v: Any = None
        self.tokens = 0
        self._view: tuple[TokenView, TokenView] | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        kq, vq = self._encode(keys), self._encode(values)
        self.k = kq if self.k is None else self._concat([self.k, kq])
        self.v = vq if self.v is None else self._concat([self.v, vq])
        self.tokens += keys.shape[-2]
        if self._view is not None:
            self._view[0].append(self._decode(kq))
            self._view[1].append(self._decode(vq))

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._view is None:
            self._view = (TokenView(self._decode(self.k)), TokenView(self._decode(self.v)))
        return self._view[0].tensor(), self._view[1].tensor()

    def keep(self, idx: torch.Tensor) -> None:
        self.k = self.k.index_select_tokens(idx)
        self.v = self.v.index_select_tokens(idx)
        self.tokens = idx.shape[-1]
        self._view = None

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()

    def __len__(self) -> int:
        return self.tokens
