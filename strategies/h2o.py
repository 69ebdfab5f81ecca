"""H2O: heavy hitters by accumulated attention, re-selected while decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import ScoreInputs, Selector


@dataclass
class H2O(Selector):
    """Keep the tokens that have received the most attention so far, plus a recent window.

    Mechanism: every token's score is the attention it has received, summed over all queries so far (prompt
    queries at prefill, then each decoded query) and over the query heads of its KV head. When the cache
    outgrows the budget, the lowest-scoring tokens outside the recent window are evicted for good.
    Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs", NeurIPS 2023.
    With ``normalize`` (the default) a prompt token's score is the attention it received divided by the number
    of prompt queries that see it (``T - j`` for key ``j``, causal), as kvpress's observed-attention score does:
    a raw sum favours early tokens only because more queries see them.
    Deviations: the budget is a ratio of the tokens seen so far (or a fixed count) rather than a fixed cache
    size; prompt scores come from the whole prompt (computed once per prompt; O(T^2) in chunks); decode steps add
    each step's attention to the prompt score (every key present is seen by the new query, so the counts grow
    together; the running value is not re-divided). ``normalize=False`` is the raw summed score kvtune used before.
    Parameters: ``budget``; ``recent`` 0..256 (paper: half the budget); ``sinks`` >= 0 (paper: 0); ``normalize``.
    """

    name: ClassVar[str] = "h2o"
    citation: ClassVar[str] = "Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, NeurIPS 2023"
    summary: ClassVar[str] = "accumulated attention (heavy hitters) + recent, re-selected during decode"
    needs: ClassVar[frozenset[str]] = frozenset({"attention_sums"})
    decode_time: ClassVar[bool] = True

    sinks: int = 0
    recent: int = 32
    normalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        super().__post_init__()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.attention_sums is None:
            raise ValueError("h2o needs accumulated attention; the runtime did not record it")
        if not self.normalize:
            return inputs.attention_sums
        t = inputs.attention_sums.shape[-1]
        seen_by = torch.arange(t, 0, -1, device=inputs.attention_sums.device, dtype=torch.float32)  # (T,)
        return inputs.attention_sums / seen_by

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("h2o.budget", 0.1, 0.9, step=0.05),
            "recent": trial.suggest_categorical("h2o.recent", [16, 64]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.05), recent {16, 64}"
