"""TOVA: evict the token the current query attends to least."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import ScoreInputs, Selector


@dataclass
class TOVA(Selector):
    """Token Omission Via Attention: keep the tokens the *latest* query attends to most, head-averaged.

    Mechanism: a token's score is the attention weight the most recent query gives it, averaged over every
    head of the layer (one kept set for the whole layer, as the paper found best); at the end of prefill that
    is the prompt's last query, then each decode step's. Unlike H2O nothing accumulates: a token that stops
    being attended is dropped. Paper: Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024.
    Deviations: the paper evicts one token per step from the first token on (prefill included); kvtune selects
    once at the end of prefill and then whenever the cache is over budget. When a forward feeds several
    tokens at once (a chunk), the chunk's attention is summed and eviction happens once per chunk; kvtune's
    quality evaluation feeds decode-time selectors one token per forward, as generation does.
    Parameters: ``budget`` (paper: a fixed token count; a ratio also works); ``sinks``/``recent`` >= 0
    (paper: 0; defaults keep 4 sinks and no window).
    """

    name: ClassVar[str] = "tova"
    citation: ClassVar[str] = "Oren et al., Transformers are Multi-State RNNs, EMNLP 2024"
    summary: ClassVar[str] = "latest query's attention, head-averaged, re-selected during decode"
    needs: ClassVar[frozenset[str]] = frozenset({"window_queries"})
    decode_time: ClassVar[bool] = True

    sinks: int = 4
    recent: int = 0

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        k = inputs.keys  # (B, H, T, D)
        b, h, t, d = k.shape
        if inputs.attention_sums is not None and inputs.window_queries is None:
            return inputs.attention_sums.mean(dim=1, keepdim=True).expand(b, h, t)
        if inputs.window_queries is None:
            raise ValueError("tova needs the prompt's last query; the runtime did not record it")
        q = inputs.window_queries[:, :, -1]  # (B, Hq, D)
        hq = q.shape[1]
        logits = torch.einsum("bhgd,bhtd->bhgt", q.view(b, h, hq // h, d).float(), k.float()) * inputs.scaling
        probs = logits.softmax(dim=-1)  # (B, H, G, T); the last query sees every key
        return probs.mean(dim=(1, 2)).unsqueeze(1).expand(b, h, t)

    def update_scores(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The latest step's attention only, averaged over the layer's heads; earlier steps are forgotten."""
        b, h, t = probs.shape
        return probs.mean(dim=1, keepdim=True).expand(b, h, t).contiguous()

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("tova.budget", 0.1, 0.9, step=0.1),
            "sinks": trial.suggest_categorical("tova.sinks", [0, 4]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.1), sinks {0, 4}"
