"""PyramidKV: SnapKV scoring with budgets that shrink from the lower layers to the upper ones."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

from kvtune.strategies.base import budget_tokens
from kvtune.strategies.snapkv import SnapKV


@lru_cache(maxsize=4096)
def pyramid_allocation(total: int, layers: int, tokens: int, floor: int, beta: int) -> tuple[int, ...]:
    """Split ``total`` kept tokens over ``layers`` layers along a line from the bottom layer to the top one.

    The top layer's share is ``1/beta`` of the mean, the bottom one's ``2 - 1/beta``; each layer stays within
    ``[floor, tokens]`` (excess from capped layers goes to the others in the same proportions) and the integer
    shares sum to ``total`` exactly (largest remainders). Requires ``layers * floor <= total <= layers * tokens``.
    """
    if layers == 1:
        return (total,)
    top, bottom = 1.0 / beta, 2.0 - 1.0 / beta
    weight = [bottom - (bottom - top) * i / (layers - 1) for i in range(layers)]
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(layers) if i not in fixed]
        remaining = total - sum(fixed.values())
        wsum = sum(weight[i] for i in free)
        share = {i: remaining * weight[i] / wsum for i in free}
        over = [i for i in free if share[i] > tokens]
        under = [i for i in free if share[i] < floor]
        if over:
            fixed.update({i: float(tokens) for i in over})
        elif under:
            fixed.update({i: float(floor) for i in under})
        else:
            break
        if len(fixed) == layers:
            break
    exact = [fixed.get(i, share.get(i, 0.0)) for i in range(layers)]
    alloc = [math.floor(x) for x in exact]
    rest = total - sum(alloc)
    order = sorted(range(layers), key=lambda i: (alloc[i] - exact[i], i))  # largest fractional part first
    for i in order[:rest]:
        alloc[i] += 1
    return tuple(alloc)


@dataclass
class PyramidKV(SnapKV):
    """SnapKV's observation-window scores, with a per-layer budget that decreases linearly with depth.

    Mechanism: lower layers attend broadly and keep more tokens, upper layers concentrate attention on a few
    and keep fewer; the budgets form an arithmetic sequence whose top term is ``1/beta`` of the mean and whose
    sum over layers equals the uniform budget's (so bytes per token are the same as SnapKV at one budget).
    Within a layer, selection is SnapKV's. Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based
    on Pyramidal Information Funneling", 2024. Deviations: the paper's budget counts exclude the observation
    window, here the window is part of every layer's budget and is the floor no layer goes below; layers capped
    at the context length give their excess to the others. Parameters: SnapKV's (``budget``, ``window``
    1..64, ``kernel`` odd, ``pooling``), ``beta`` 1..100 (paper: 20; 1 = uniform, SnapKV).
    """

    name: ClassVar[str] = "pyramidkv"
    citation: ClassVar[str] = ("Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal "
                               "Information Funneling, 2024")
    summary: ClassVar[str] = "SnapKV scores, layer budgets shrinking with depth"

    beta: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, int) or not 1 <= self.beta <= 100:
            raise ValueError(f"beta must be an int in 1..100, got {self.beta!r}")
        super().__post_init__()

    def layer_keep(self, tokens: int, layer_idx: int, num_layers: int) -> int:
        mean = budget_tokens(self.budget, tokens)
        floor = min(mean, self.sinks + self.recent)
        return pyramid_allocation(mean * num_layers, num_layers, tokens, floor, self.beta)[layer_idx]

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "budget": trial.suggest_float("pyramidkv.budget", 0.1, 0.9, step=0.1),
            "window": trial.suggest_categorical("pyramidkv.window", [16, 32]),
            "beta": trial.suggest_categorical("pyramidkv.beta", [5, 20]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.1), window {16, 32}, beta {5, 20}"
