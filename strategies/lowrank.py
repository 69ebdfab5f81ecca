"""Low-rank keys: each head's keys stored as coefficients on a rank-r basis fitted to that head's prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import Codec, Store, tensor_bytes


class LowRankStore(Store):
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.basis: torch.Tensor | None = None  # (B, H, D, r) orthonormal columns, fitted at the first append
        self.coef: torch.Tensor | None = None  # (B, H, N, r) keys @ basis
        self.v: torch.Tensor | None = None  # (B, H, N, D) values as given
        self.tokens = 0

    def _fit(self, keys: torch.Tensor) -> None:
        d = keys.shape[-1]
        r = min(self.rank, d)
        # right singular vectors of each head's (T, D) key matrix: vh (B, H, D, D). A prompt shorter than D
        # needs full_matrices to still yield r orthonormal directions; a longer one must not ask for them (U would
        # be T x T per head: 16 GB at 22K tokens x 8 heads), and its reduced vh is already D x D
        _u, _s, vh = torch.linalg.svd(keys.float(), full_matrices=keys.shape[-2] < d)
        self.basis = vh[..., :r, :].transpose(-1, -2).contiguous().to(keys.dtype)  # (B, H, D, r)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.basis is None:
            self._fit(keys)
        coef = keys @ self.basis  # (B, H, T, r)
        self.coef = coef if self.coef is None else torch.cat([self.coef, coef], dim=-2)
        self.v = values if self.v is None else torch.cat([self.v, values], dim=-2)
        self.tokens += keys.shape[-2]

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.coef is not None and self.basis is not None and self.v is not None, "decoded() before append"
        return self.coef @ self.basis.transpose(-1, -2), self.v  # (B, H, N, D)

    def keep(self, idx: torch.Tensor) -> None:
        assert self.coef is not None and self.v is not None
        self.coef = self.coef.gather(2, idx.unsqueeze(-1).expand(*idx.shape, self.coef.shape[-1]))
        self.v = self.v.gather(2, idx.unsqueeze(-1).expand(*idx.shape, self.v.shape[-1]))
        self.tokens = idx.shape[-1]

    def nbytes(self) -> int:
        return tensor_bytes(self.basis, self.coef, self.v)

    def __len__(self) -> int:
        return self.tokens


@dataclass
class LowRank(Codec):
    """Keys projected on a rank-``rank`` basis per KV head; values uncompressed.

    Mechanism: the key matrix of a head is close to low rank; storing ``K @ P`` (``T x r``) and the basis ``P``
    (``D x r``, orthonormal, the top right singular vectors of the head's prompt keys) and reconstructing
    ``(K P) P^T`` for attention cuts the key bytes by ``D / r``. Paper: Chang et al., "Palu: Compressing
    KV-Cache with Low-Rank Projection", ICLR 2025 (and Saxena et al., "Eigen Attention", 2024).
    Deviations: Palu factorizes the key/value *projection weights* offline on calibration data, caches the
    pre-RoPE latent and re-applies RoPE after reconstruction (with a fused kernel), and compresses values too;
    here the calibration pass is the prompt's own prefill (one SVD per layer and head at the first append,
    decoded tokens reuse that basis), keys are post-RoPE (RoPE spreads energy over more directions, so a given
    rank loses more than Palu's), values stay uncompressed. Fitting on the very prompt it compresses is
    optimistic for the prompt and pessimistic for what drifts after it. Parameters: ``rank`` 1..head_dim
    (refused above the head dim when the model is known; capped at it otherwise).
    """

    name: ClassVar[str] = "lowrank"
    citation: ClassVar[str] = "Chang et al., Palu: Compressing KV-Cache with Low-Rank Projection, ICLR 2025"
    summary: ClassVar[str] = "keys on a per-head rank-r basis fitted at prefill; values uncompressed"

    rank: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 1024:
            raise ValueError(f"rank must be an int in 1..1024 (capped at head_dim), got {self.rank!r}")

    def check_model(self, spec: Any) -> None:
        if self.rank > spec.head_dim:
            raise ValueError(f"rank must be <= the head dim ({spec.head_dim}), got {self.rank}")

    def new_store(self) -> Store:
        return LowRankStore(self.rank)

    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        r = min(self.rank, head_dim)
        es = torch.finfo(dtype).bits // 8
        return batch * heads * (tokens * r + head_dim * r + tokens * head_dim) * es

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {"rank": trial.suggest_categorical("lowrank.rank", [16, 32, 48])}

    @classmethod
    def search_space_doc(cls) -> str:
        return "rank {16, 32, 48}"
