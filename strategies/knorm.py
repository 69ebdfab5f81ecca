"""KNorm: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import ScoreInputs, Selector


@dataclass
class KNorm(Selector):
    """Score each token by minus the L2 norm of its key; low-norm keys attract attention and stay.

    Mechanism: ``score = -||k||_2`` per KV head (no queries needed, so it works with any attention kernel).
    Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP
    2024. Deviations: norms of post-RoPE keys (rotation preserves the norm, so identical); the paper keeps no
    recent window, the default here follows it (``recent`` 0), the search may add one.
    Parameters: ``budget``; ``sinks`` >= 0 (default 0); ``recent`` >= 0 (default 0); ``recompress_every``.
    """

    name: ClassVar[str] = "knorm"
    citation: ClassVar[str] = ("Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache "
                               "Compression, EMNLP 2024")
    summary: ClassVar[str] = "smallest key L2 norm (query-free)"

    sinks: int = 0
    recent: int = 0

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)  # (B, H, T)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("knorm.budget", 0.1, 0.9, step=0.1),
            "recent": trial.suggest_categorical("knorm.recent", [0, 32]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.1), recent {0, 32}"
