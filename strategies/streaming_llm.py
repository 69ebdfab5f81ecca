"""StreamingLLM: attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import ScoreInputs, Selector


@dataclass
class StreamingLLM(Selector):
    """Keep the first ``sinks`` tokens and the most recent ones, drop the middle.

    Mechanism: the score of a token is its position, so the shared top-k keeps the newest tokens after the
    sinks. Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024.
    Deviations: the paper re-assigns positions inside the cache (rolling RoPE); kvtune keeps the original
    positions (keys are stored post-RoPE), as most serving stacks do. Applied once at the end of prefill.
    Parameters: ``budget`` (ratio in (0, 1] or tokens >= 1), ``sinks`` (0..64, paper: 4).
    """

    name: ClassVar[str] = "streaming_llm"
    citation: ClassVar[str] = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024"
    summary: ClassVar[str] = "sinks + most recent tokens"

    recent: int = 0  # the whole non-sink budget is the recent window; this field only adds a hard floor

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, h, t, _ = inputs.keys.shape
        return torch.arange(t, dtype=torch.float32, device=inputs.keys.device).expand(b, h, t)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("streaming_llm.budget", 0.1, 0.9, step=0.05),
            "sinks": trial.suggest_categorical("streaming_llm.sinks", [4, 16]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.05), sinks {4, 16}"
