"""Spill-and-recall: the GPU attends to the top pages, every token stays in the host tier, pages come back.

The Quest / ShadowKV / RocketKV family for multi-turn serving: a selector decides what the GPU *attends to*,
but nothing is dropped for good. :class:`SpillStore` holds two tiers per layer:

* the **host tier**: every token seen, in the host codec (``fp16``: the values as computed; ``int8``/``fp8``:
  a compact copy), written through as tokens arrive — O(n) memory, off the GPU;
* the **GPU tier**: a store of the pipeline's codec with the resident tokens only (sinks, the recent window and
  the top-scoring pages), plus each page's per-channel key bounds (Quest's page metadata) and the resident
  positions (the page table).

At the end of prefill the selector picks the resident pages; the rest leave the GPU (they stay on the host).
At each new turn (the runtime's turn boundary) and, with ``recompress_every`` = N, every N decoded tokens, the
pages are re-scored against the latest queries and the top pages become the resident set: pages that were on
the host are recalled (counted in :attr:`SpillStore.recalled_tokens`, the bytes a deployment copies over the
host link), pages that fell out of the top leave the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from kvtune.strategies.base import ScoreInputs, Selector, Store, tensor_bytes

HOST_CODECS = ("fp16", "int8", "fp8")  # codecs the host tier may hold every token in


def page_bounds(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page, per-channel key minimum and maximum: keys (B, H, T, D) -> ((B, H, P, D), (B, H, P, D))."""
    b, h, t, d = keys.shape
    pages = math.ceil(t / page_size)
    pad = pages * page_size - t
    k = keys.float()
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).view(b, h, pages, page_size, d)
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).view(b, h, pages, page_size, d)
    return lo.amin(dim=3), hi.amax(dim=3)


class SpillStore(Store):
    """A GPU tier (the codec's store, resident tokens) over a host tier (every token, the host codec).

    ``decoded()`` and ``attend()`` read the GPU tier only: attention sees the resident tokens. ``keep(idx)``
    (indices into the resident tokens) moves the others off the GPU; they stay in the host tier.
    ``reselectable()`` gives every token seen (from the host tier, in position order) and ``reselect(idx)``
    (indices into those) makes exactly those tokens resident, recalling the ones on the host.
    """

    def __init__(self, gpu_factory: Callable[[], Store], host: Store, page_size: int) -> None:
        self.gpu_factory = gpu_factory
        self.gpu = gpu_factory()
        self.host = host
        self.page_size = page_size
        self.resident: torch.Tensor | None = None  # (B, H, N_gpu) int32 positions of the resident tokens, ascending
        self.page_min: torch.Tensor | None = None  # (B, H, P, D) Quest page metadata, kept on the GPU
        self.page_max: torch.Tensor | None = None
        self.seen = 0  # tokens written (host tier length)
        self.recalled_tokens = 0  # tokens copied host -> GPU by re-selections, summed over rows and heads

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, t, _ = keys.shape
        pos = torch.arange(self.seen, self.seen + t, device=keys.device, dtype=torch.int32).expand(b, h, t)
        self.gpu.append(keys, values)
        self.host.append(keys, values)  # write-through: the host tier holds every token
        self.resident = pos.clone() if self.resident is None else torch.cat([self.resident, pos], dim=-1)
        self.seen += t
        self.page_min, self.page_max = page_bounds(self.host.decoded()[0], self.page_size)

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gpu.decoded()

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        return self.gpu.attend(query, scale, return_probs)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep ``idx`` (B, H, K) of the resident tokens on the GPU; the rest remain in the host tier only."""
        assert self.resident is not None
        self.gpu.keep(idx)
        self.resident = self.resident.gather(2, idx.to(torch.int64))

    def reselectable(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.host.decoded()

    def reselect(self, idx: torch.Tensor) -> None:
        """Make exactly ``idx`` (B, H, K) of every token seen resident: recall from the host what is not."""
        assert self.resident is not None
        b, h, _ = idx.shape
        was = torch.zeros(b, h, self.seen, dtype=torch.bool, device=idx.device)
        was.scatter_(2, self.resident.to(torch.int64), True)
        self.recalled_tokens += int((~was.gather(2, idx)).sum())
        keys, values = self.host.decoded()
        gather = idx.unsqueeze(-1).expand(*idx.shape, keys.shape[-1])  # (B, H, K, D)
        self.gpu = self.gpu_factory()  # the GPU tier is refilled from the host copy
        self.gpu.append(keys.gather(2, gather), values.gather(2, gather))
        self.resident = idx.to(torch.int32)

    def gpu_nbytes(self) -> int:
        """Bytes on the GPU: the resident tokens in the codec's form, the page metadata, the page table."""
        return self.gpu.nbytes() + tensor_bytes(self.page_min, self.page_max, self.resident)

    def host_nbytes(self) -> int:
        return self.host.nbytes()

    def nbytes(self) -> int:
        return self.gpu_nbytes() + self.host_nbytes()

    def __len__(self) -> int:
        """Tokens attention sees (resident on the GPU) per head."""
        return len(self.gpu)

    def tokens_held(self) -> int:
        """Tokens held anywhere (the host tier holds every token seen)."""
        return len(self.host)


@dataclass
class SpillRecall(Selector):
    """Score pages of ``page_size`` tokens by Quest's bound on q·k; the top pages stay on the GPU, the rest spill.

    Mechanism: each page keeps the per-channel minimum and maximum of its keys; for a query q the page's score
    is ``sum_d max(q_d * kmax_d, q_d * kmin_d)``, an upper bound on any q·k inside it, maximised over the last
    ``window`` queries and the query heads of each KV head. The budget's worth of tokens (sinks and the recent
    window first, then whole pages in score order) is resident on the GPU; every token also sits in the host
    tier (:class:`SpillStore`), so the next turn's re-scoring can recall any page. Papers: Tang et al., "Quest:
    Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024 (page scoring); Sun et al.,
    "ShadowKV", 2024 and Behnam et al., "RocketKV", 2025 (full KV kept off the GPU, top pages recalled per
    query; recommended for multi-turn by the KV-cache survey).
    Deviations: Quest re-selects pages at every decode step and never evicts; here the resident set is chosen at
    the end of prefill, at each new turn, and every ``recompress_every`` decoded tokens (0: turns only), and
    attention in between reads the resident set only (a decode step between re-selections does not re-score).
    ShadowKV keeps low-rank keys on the GPU and values on the host; here both go to the host in
    ``host_codec``. The GPU tier is refilled from the host copy at each re-selection (with ``host_codec``
    fp16 the values are exact).
    Parameters: ``budget`` (GPU-resident share of the tokens seen, or a count); ``page_size`` 8..128 (Quest:
    16); ``window`` 1..64 queries; ``sinks``, ``recent``; ``recompress_every`` decode tokens between re-scorings
    (0 = at turns only); ``host_codec`` fp16|int8|fp8.
    """

    name: ClassVar[str] = "spill_recall"
    citation: ClassVar[str] = ("Tang et al., Quest, ICML 2024; Sun et al., ShadowKV, 2024; Behnam et al., RocketKV, "
                               "2025")
    summary: ClassVar[str] = "top pages on the GPU, every token in the host tier, pages recalled per turn"
    needs: ClassVar[frozenset[str]] = frozenset({"window_queries"})
    drops_tokens: ClassVar[bool] = False
    spills: ClassVar[bool] = True

    sinks: int = 4
    recent: int = 32
    page_size: int = 16
    window: int = 16
    host_codec: str = "fp16"

    def __post_init__(self) -> None:
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or not 8 <= self.page_size <= 128:
            raise ValueError(f"page_size must be an int in 8..128, got {self.page_size!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 1 <= self.window <= 64:
            raise ValueError(f"window must be an int in 1..64, got {self.window!r}")
        if self.host_codec not in HOST_CODECS:
            raise ValueError(f"host_codec must be one of {', '.join(HOST_CODECS)}, got {self.host_codec!r}")
        super().__post_init__()

    def host_codec_name(self) -> str | None:
        return self.host_codec

    def wrap_store(self, gpu_factory: Callable[[], Store]) -> Store:
        from kvtune.strategies import build  # the registry imports this module

        host = build("codec", self.host_codec, {})
        return SpillStore(gpu_factory, host.new_store(), self.page_size)  # type: ignore[union-attr]

    def page_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        """(B, H, P): Quest's upper bound of q·k per page, max over the window's queries and the group's heads."""
        if inputs.window_queries is None:
            raise ValueError("spill_recall needs the latest queries; the runtime did not record them")
        lo, hi = page_bounds(inputs.keys, self.page_size)  # (B, H, P, D)
        q = inputs.window_queries[:, :, -self.window :].float()  # (B, Hq, W, D)
        b, h, p, d = lo.shape
        hq, w = q.shape[1], q.shape[2]
        q = q.reshape(b, h, (hq // h) * w, 1, d)  # (B, H, G*W, 1, D)
        bound = torch.maximum(q * hi.unsqueeze(2), q * lo.unsqueeze(2)).sum(-1)  # (B, H, G*W, P)
        return bound.amax(dim=2)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Whole pages in score order: a token's score is minus its rank (page rank * page_size + offset), so the
        shared top-k takes the best pages whole and the last one from its start."""
        b, h, t, _ = inputs.keys.shape
        pages = self.page_scores(inputs)  # (B, H, P)
        rank = pages.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # (B, H, P): 0 = best page
        pos = torch.arange(t, device=inputs.keys.device)
        key = rank[:, :, pos // self.page_size] * self.page_size + (pos % self.page_size)  # (B, H, T)
        return -key.float()

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("spill_recall.budget", 0.1, 0.6, step=0.05),
            "page_size": trial.suggest_categorical("spill_recall.page_size", [16, 32]),
            "host_codec": trial.suggest_categorical("spill_recall.host_codec", ["fp16", "int8"]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.6 (step 0.05), page_size {16, 32}, host_codec {fp16, int8}"
