"""SnapKV without the question: the context is compressed when it is prefilled, before anyone asks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvtune.strategies.snapkv import SnapKV


@dataclass
class SnapKVAgnostic(SnapKV):
    """SnapKV's scores with the context's own last queries as the observation window, so one compressed context
    serves questions not yet asked.

    Mechanism: identical scoring to :class:`~kvtune.strategies.snapkv.SnapKV` (window attention, pooled), but the
    selection runs at the end of the *context's* prefill, before the first question arrives (kvpress's
    query-agnostic setting, and the setting of SCBench's shared-context multi-turn mode). Its window is the
    context's tail, so what it keeps is what the text itself points at, not what one question asks.
    Paper: Li et al., SnapKV (NeurIPS 2024) for the score; the query-agnostic protocol follows kvpress
    (NVIDIA, 2024) and Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", 2025.
    Deviations: KVzip scores by the attention of a context-reconstruction pass ("repeat the context"), which
    costs a second prefill; this variant uses the context's own last queries instead (no extra forward). It
    differs from SnapKV only where the runtime sees the context before the question (multi-turn probes: the
    shared context is prefilled on its own); in a single prompt that ends with its question it is SnapKV.
    Parameters: as SnapKV (``budget``, ``window`` 1..64, ``kernel`` odd, ``pooling`` max|avg).
    """

    name: ClassVar[str] = "snapkv_agnostic"
    citation: ClassVar[str] = ("Li et al., SnapKV, NeurIPS 2024 (score); kvpress query-agnostic setting; Kim et al., "
                               "KVzip, 2025")
    summary: ClassVar[str] = "SnapKV scored on the context alone, before the question (query-agnostic)"
    query_agnostic: ClassVar[bool] = True

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("snapkv_agnostic.budget", 0.1, 0.9, step=0.05),
            "window": trial.suggest_categorical("snapkv_agnostic.window", [16, 32]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.05), window {16, 32}"
