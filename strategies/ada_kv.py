"""Ada-KV: one budget per layer, spread over its heads by their scores (variable length per head)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import ScoreInputs
from kvtune.strategies.snapkv import SnapKV


@dataclass
class AdaKV(SnapKV):
    """SnapKV's scores, but the layer's budget ``K * H`` goes to the top ``K * H`` scores over *all* its heads.

    Mechanism: heads whose attention is concentrated need few tokens, diffuse heads need many; selecting the
    top scores of the flattened (heads x tokens) score map gives each head a different count. A safeguard keeps
    at least ``alpha_safeguard * K`` tokens (and the sinks and recent window) in every head. The cache then
    holds each head's tokens in its own store (:class:`~kvtune.strategies.ragged.RaggedStore`): memory is
    really freed, attention masks only the padding of a per-head view. Paper: Feng et al., "Ada-KV: Optimizing
    KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference", 2024 (with SnapKV scoring).
    Deviations: with GQA the scores are SnapKV's group mean per KV head (the paper's heads are KV heads of MHA
    models); attention over per-head lengths pads to the longest head in the runtime, while the store and the
    decode kernel (lengths per folded head) hold and read only the kept tokens. Prefill-time only
    (``recompress_every`` not supported: re-selection over ragged heads is not implemented).
    Parameters: SnapKV's (``budget``, ``window``, ``kernel``, ``pooling``); ``alpha_safeguard`` 0..1
    (paper: 0.2).
    """

    name: ClassVar[str] = "ada_kv"
    citation: ClassVar[str] = ("Feng et al., Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation "
                               "for Efficient LLM Inference, 2024")
    summary: ClassVar[str] = "SnapKV scores, adaptive per-head budgets, ragged per-head storage"
    ragged: ClassVar[bool] = True

    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.alpha_safeguard, bool) or not 0.0 <= float(self.alpha_safeguard) <= 1.0:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard!r}")
        if self.recompress_every:
            raise ValueError("recompress_every: ada_kv selects once at prefill (ragged re-selection not implemented)")
        super().__post_init__()

    def select_ragged(self, inputs: ScoreInputs, tokens_seen: int | None = None) -> list[list[torch.Tensor]] | None:
        b, h, t, _ = inputs.keys.shape
        keep = self.layer_keep(tokens_seen if tokens_seen is not None else t, inputs.layer_idx, inputs.num_layers)
        if keep >= t:
            return None
        scores = self.score(inputs).float().clone()  # (B, H, T)
        n_sink = min(self.sinks, keep)
        n_recent = min(self.recent, keep - n_sink)
        big = torch.finfo(torch.float32).max
        scores[:, :, :n_sink] = big
        if n_recent:
            scores[:, :, t - n_recent :] = big
        floor = min(keep, max(n_sink + n_recent, math.ceil(float(self.alpha_safeguard) * keep)))
        if floor:
            guarded = scores.topk(floor, dim=-1).indices  # (B, H, floor) incl. protected tokens
            scores.scatter_(-1, guarded, big)
        chosen = scores.reshape(b, h * t).topk(keep * h, dim=-1).indices  # (B, K*H)
        mask = torch.zeros(b, h * t, dtype=torch.bool, device=scores.device)
        mask.scatter_(-1, chosen, True)
        mask = mask.view(b, h, t)
        return [[mask[i, j].nonzero().squeeze(-1) for j in range(h)] for i in range(b)]

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("ada_kv.budget", 0.1, 0.9, step=0.1),
            "window": trial.suggest_categorical("ada_kv.window", [16, 32]),
            "alpha_safeguard": trial.suggest_categorical("ada_kv.alpha_safeguard", [0.2, 0.5]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.1), window {16, 32}, alpha_safeguard {0.2, 0.5}"
