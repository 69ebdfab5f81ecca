"""Sliding window: keep only the most recent tokens (no sinks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import ScoreInputs, Selector


@dataclass
class SlidingWindow(Selector):
    """Keep the newest ``budget`` tokens of the context and nothing else.

    Mechanism: a token's score is its position, and no sink tokens are protected, so the shared top-k keeps a
    window of the most recent tokens. Reference: the local attention window of Longformer (Beltagy et al.,
    2020) and Mistral 7B (Jiang et al., 2023); StreamingLLM (Xiao et al., ICLR 2024) shows why it fails without
    sinks when the window slides at decode time. Deviations: these models are *trained* with a window; applied
    to a model trained with full attention it is the ablation StreamingLLM reports. Positions are kept (no
    re-rotation). Applied at the end of prefill, and every ``recompress_every`` decoded tokens if set (a
    truly sliding window). Parameters: ``budget`` (ratio in (0, 1] or tokens >= 1); ``recompress_every``
    0..4096.
    """

    name: ClassVar[str] = "sliding_window"
    citation: ClassVar[str] = "Beltagy et al., Longformer, 2020; Jiang et al., Mistral 7B, 2023 (local window)"
    summary: ClassVar[str] = "most recent tokens only (no sinks)"

    sinks: int = 0
    recent: int = 0

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, h, t, _ = inputs.keys.shape
        return torch.arange(t, dtype=torch.float32, device=inputs.keys.device).expand(b, h, t)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {"budget": trial.suggest_float("sliding_window.budget", 0.1, 0.9, step=0.1)}

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.1)"
