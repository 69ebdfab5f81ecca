"""SnapKV: the prompt's last queries vote for the keys worth keeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kvtune.strategies.base import ScoreInputs, Selector, check_budget


@dataclass
class SnapKV(Selector):
    """Score each prompt token by the attention the last ``window`` prompt queries pay it, pooled.

    Mechanism: softmax(q_window @ K^T) summed over the window, smoothed with a 1-D max/avg pool of size
    ``kernel``, averaged over the query heads of each KV head (GQA); the window itself is always kept.
    Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024.
    Deviations: with GQA the paper's per-query-head selection would need per-query-head caches; kvtune averages
    the group's scores so each KV head keeps one set (as kvpress does). Applied once at the end of prefill.
    Parameters: ``budget``; ``window`` 1..64 (paper: 32); ``kernel`` odd 1..15 (paper: 7); ``pooling``
    max|avg; ``sinks`` >= 0 (paper: 0).
    """

    name: ClassVar[str] = "snapkv"
    citation: ClassVar[str] = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024"
    summary: ClassVar[str] = "observation-window attention, pooled, per-head top-k"
    needs: ClassVar[frozenset[str]] = frozenset({"window_queries"})

    sinks: int = 0
    recent: int = 32
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not 1 <= self.window <= 64:
            raise ValueError(f"window must be in 1..64, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number >= 1, got {self.kernel}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        # the observation window is kept as SnapKV does
        self.recent = max(self.recent, self.window)
        super().__post_init__()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.window_queries is None:
            raise ValueError("snapkv needs the prompt's window queries; the runtime did not record them")
        q = inputs.window_queries[:, :, -self.window :]  # (B, Hq, W, D)
        k = inputs.keys  # (B, H, T, D)
        b, h, t, d = k.shape
        hq, w = q.shape[1], q.shape[2]
        group = hq // h
        logits = torch.einsum("bhgwd,bhtd->bhgwt", q.view(b, h, group, w, d).float(), k.float()) * inputs.scaling
        # causal: window query i sits at position t - w + i and sees keys up to there
        pos_q = torch.arange(t - w, t, device=k.device).view(w, 1)
        pos_k = torch.arange(t, device=k.device).view(1, t)
        logits = logits.masked_fill(pos_k > pos_q, float("-inf"))
        votes = logits.softmax(dim=-1).sum(dim=-2)  # (B, H, G, T)
        flat = votes.reshape(b * h * group, 1, t)
        pad = self.kernel // 2
        if self.pooling == "max":
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        else:
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad, count_include_pad=False)
        return pooled.view(b, h, group, t).mean(dim=2)  # (B, H, T)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("snapkv.budget", 0.1, 0.9, step=0.05),
            "window": trial.suggest_categorical("snapkv.window", [16, 32]),
            "kernel": trial.suggest_categorical("snapkv.kernel", [5, 7]),
            "pooling": trial.suggest_categorical("snapkv.pooling", ["max", "avg"]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.05), window {16, 32}, kernel {5, 7}, pooling {max, avg}"
