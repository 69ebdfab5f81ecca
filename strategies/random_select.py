"""Random eviction: the baseline every selector must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.strategies.base import ScoreInputs, Selector


@dataclass
class Random(Selector):
    """Keep a uniformly random subset of the tokens (plus sinks/recent if asked).

    Mechanism: i.i.d. uniform scores from a generator seeded by ``seed`` and the layer index, so a pipeline
    is reproducible run to run and layers draw different subsets (the rows of a batch share their layer's
    draw). Reference: the random baseline of the eviction literature (e.g. kvpress's RandomPress). Deviations: none; every KV head draws its own subset.
    Parameters: ``budget``; ``seed`` >= 0; ``sinks``/``recent`` >= 0 (default 0: purely random).
    """

    name: ClassVar[str] = "random"
    citation: ClassVar[str] = "baseline (uniformly random eviction, as kvpress RandomPress)"
    summary: ClassVar[str] = "uniformly random tokens (baseline)"

    sinks: int = 0
    recent: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        super().__post_init__()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, h, t, _ = inputs.keys.shape
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + inputs.layer_idx)
        # one draw per (head, position), shared by the batch rows: a row's subset does not depend on its batch
        return torch.rand((1, h, t), generator=gen).to(inputs.keys.device).expand(b, h, t)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {"budget": trial.suggest_float("random.budget", 0.1, 0.9, step=0.1)}

    @classmethod
    def search_space_doc(cls) -> str:
        return "budget 0.1-0.9 (step 0.1)"
