"""Plugin strategies for the export tests: methods a third party registers that no exporter knows.

Exports only take valid pipelines (every method registered, every parameter in range), so a method unknown to
the exporters can only come from a plugin (the ``kvtune.strategies`` entry-point group). These two stand for
such plugins, registered for each test and removed after it (other test folders iterate over the registry).

No ``from __future__ import annotations`` here: validate_pipeline reads the plugins' type hints, and string
annotations would be resolved in ``sys.modules["conftest"]``, which is another folder's conftest once pytest has
imported it (NameError: ClassVar when tests/strategies is collected after tests/export).
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

from kvtune.strategies import PLACEMENTS, SELECTORS, Placement, ScoreInputs, Selector


@dataclass
class Quest(Selector):
    """Page-level selection by query-aware key bounds (Tang et al., Quest, ICML 2024); scores by position here."""

    name: ClassVar[str] = "quest"
    page: int = 16

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, h, t, _ = inputs.keys.shape
        return torch.arange(t, dtype=torch.float32).expand(b, h, t)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {}


@dataclass
class NvmeDirect(Placement):
    """KV blocks read from NVMe straight into GPU memory."""

    name: ClassVar[str] = "nvme_direct"
    queue_depth: int = 8

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {}


@pytest.fixture(autouse=True)
def plugin_strategies():
    SELECTORS[Quest.name] = Quest
    PLACEMENTS[NvmeDirect.name] = NvmeDirect
    yield
    SELECTORS.pop(Quest.name, None)
    PLACEMENTS.pop(NvmeDirect.name, None)
