"""Per-head variable-length storage for selectors with per-head budgets (Ada-KV).

:class:`RaggedStore` wraps any codec: it keeps one inner store of that codec per (batch row, KV head), each
holding only that head's kept tokens, so memory is really freed (no masking of a full-size cache). For
attention it hands out a right-padded view ``(B, H, N_max, D)`` (zeros beyond each head's length) plus the
per-head lengths; the runtime masks the padding inside attention, and :meth:`RaggedStore.attend` runs the
decode kernel with (batch x head) folded into the kernel's batch axis and the per-head lengths as its
``lengths``. ``nbytes()`` sums the inner stores: padding is never stored.
"""

from __future__ import annotations

import torch

from kvtune.strategies.base import Codec, Store


class RaggedStore(Store):
    def __init__(self, codec: Codec, layer_idx: int = 0, num_layers: int = 1) -> None:
        self.codec, self.layer_idx, self.num_layers = codec, layer_idx, num_layers
        self.inner: list[list[Store]] = []  # [b][h], each store holds (1, 1, N_bh, D)
        self.dtype: torch.dtype | None = None

    def _ensure(self, b: int, h: int) -> None:
        if not self.inner:
            self.inner = [[self.codec.layer_store(self.layer_idx, self.num_layers) for _ in range(h)] for _ in range(b)]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h = keys.shape[:2]
        self._ensure(b, h)
        self.dtype = keys.dtype
        for i in range(b):
            for j in range(h):
                self.inner[i][j].append(keys[i : i + 1, j : j + 1], values[i : i + 1, j : j + 1])

    def append_ragged(self, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]]) -> None:
        """Add per-head token sets: ``keys[b][h]`` is (N_bh, D)."""
        self._ensure(len(keys), len(keys[0]))
        self.dtype = keys[0][0].dtype
        for i, row in enumerate(keys):
            for j, k in enumerate(row):
                self.inner[i][j].append(k[None, None], values[i][j][None, None])

    def lengths(self) -> torch.Tensor:
        """Tokens held per (batch row, head): (B, H) int64."""
        return torch.tensor([[len(s) for s in row] for row in self.inner], dtype=torch.long)

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, H, N_max, D) keys and values; positions >= lengths()[b, h] are zeros."""
        parts = [[s.decoded() for s in row] for row in self.inner]
        b, h = len(parts), len(parts[0])
        n = max(len(s) for row in self.inner for s in row)
        d = parts[0][0][0].shape[-1]
        ref = parts[0][0][0]
        k = ref.new_zeros(b, h, n, d)
        v = ref.new_zeros(b, h, n, d)
        for i in range(b):
            for j in range(h):
                kk, vv = parts[i][j]
                k[i, j, : kk.shape[-2]] = kk[0, 0]
                v[i, j, : vv.shape[-2]] = vv[0, 0]
        return k, v

    def valid_mask(self) -> torch.Tensor:
        """(B, H, N_max) bool: True where a stored token sits (right padding is False)."""
        lengths = self.lengths()
        n = int(lengths.max())
        return torch.arange(n).view(1, 1, n) < lengths.unsqueeze(-1)

    def keep(self, idx: torch.Tensor) -> None:
        for i, row in enumerate(self.inner):
            for j, s in enumerate(row):
                s.keep(idx[i : i + 1, j : j + 1])

    def keep_ragged(self, idx: list[list[torch.Tensor]]) -> None:
        """``idx[b][h]``: sorted indices (K_bh,) into that head's tokens."""
        for i, row in enumerate(self.inner):
            for j, s in enumerate(row):
                s.keep(idx[i][j].view(1, 1, -1))

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        """query (B, Hq, D): heads folded into the batch axis so the kernel masks each head at its length."""
        from kvtune.kernels.decode_attention import decode_attention

        k, v = self.decoded()  # (B, H, N, D)
        b, h, n, d = k.shape
        g = query.shape[1] // h
        out, probs = decode_attention(query.reshape(b * h, g, d), k.reshape(b * h, 1, n, d), v.reshape(b * h, 1, n, d),
                                      scale=scale, lengths=self.lengths().reshape(-1).to(query.device),
                                      return_probs=return_probs)
        return out.reshape(b, h * g, d), (probs.reshape(b, h, n) if probs is not None else None)

    def nbytes(self) -> int:
        return sum(s.nbytes() for row in self.inner for s in row)

    def __len__(self) -> int:
        """The longest head's token count (the padded view's length)."""
        if not self.inner:
            return 0
        return max(len(s) for row in self.inner for s in row)
