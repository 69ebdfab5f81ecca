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

    Mechanism: softmax(q_window @ K^T) summed over the window, for the keys *before* the window only, smoothed
    with a 1-D avg/max pool of size ``kernel`` (zero padding at the edges, counted in the average: the paper's
    code and kvpress pool this way, so the prefix's last tokens are not inflated by the window's own votes),
    averaged over the query heads of each KV head (GQA); the window itself is always kept.
    Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024.
    Defaults follow the paper's released code and kvpress 0.5.5 (window 64, kernel 5, average pooling): with
    aligned parameters kvtune keeps the same tokens as kvpress's SnapKVPress, and an exported kvpress snippet
    reproduces what was measured. (kvtune's earlier defaults, window 32 / kernel 7 / max, alone moved passkey
    from 6/10 to 1/10 on one prompt set; they stay reachable as parameters and in the search space.)
    Deviations: with GQA the paper's per-query-head selection would need per-query-head caches; kvtune averages
    the group's scores so each KV head keeps one set (as kvpress does). Applied once at the end of prefill (in a
    conversation: after each turn's question, :mod:`kvtune.measure.multiturn`).
    Parameters: ``budget``; ``window`` 1..64 (paper code and kvpress: 64); ``kernel`` odd (5); ``pooling``
    avg|max (avg); ``sinks`` >= 0 (paper: 0).
    """

    name: ClassVar[str] = "snapkv"
    citation: ClassVar[str] = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024"
    summary: ClassVar[str] = "observation-window attention, pooled, per-head top-k"
    needs: ClassVar[frozenset[str]] = frozenset({"window_queries"})

    sinks: int = 0
    recent: int = 32
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"

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
        n = t - w  # keys before the window: the only ones scored (the window is kept whole)
        if n <= 0:
            return votes.mean(dim=2)
        flat = votes[..., :n].reshape(b * h * group, 1, n)
        pad = self.kernel // 2
        if self.pooling == "max":
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        else:  # zero padding counted at the edges, as the paper's code and kvpress
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad)
        prefix = pooled.view(b, h, group, n).mean(dim=2)  # (B, H, T - W)
        # the window ranks just above the best prefix token (kept first, as the paper's code keeps it whole), its
        # tokens strictly ordered newest first: exact ties would let top-k pick differently for the same row in
        # another batch composition
        top = prefix.amax(dim=-1, keepdim=True)  # (B, H, 1)
        step = top.abs().clamp_min(1.0) * 1e-6
        window = top + step * torch.arange(1, w + 1, device=prefix.device, dtype=prefix.dtype)  # (B, H, W)
        return torch.cat([prefix, window], dim=-1)  # (B, H, T)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("snapkv.budget", 0.1, 0.9, step=0.05),
            "window": trial.suggest_categorical("snapkv.window", [32, 64]),
            "kernel": trial.suggest_categorical("snapkv.kernel", [5, 7]),
            "pooling": trial.suggest_categorical("snapkv.pooling", ["avg", "max"]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.05), window {32, 64}, kernel {5, 7}, pooling {avg, max}"
