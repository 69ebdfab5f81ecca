"""Placement (hybrid memory): where the stored KV lives. Never changes numerics, only bytes and time.

``gpu`` keeps every block on the accelerator. ``offload`` keeps a fraction of each sequence's KV blocks on the
GPU and the rest in pinned host memory (or on disk), fetching the non-resident blocks for each decode step on
a side stream, one or more layers ahead (prefetch), so that the copy overlaps the attention of the layer
before. A placement only says *where*; what each tier can hold, how fast it is read and how much of the copy
prefetch hides are rules of the hardware, kept in one place: :mod:`kvtune.measure.tiers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvtune.strategies.base import Strategy


@dataclass
class Placement(Strategy):
    category: ClassVar[str] = "placement"

    def gpu_fraction_held(self) -> float:
        """Share of each sequence's KV bytes that sit in GPU memory."""
        return 1.0

    def lower_tier(self) -> str | None:
        """Where the rest lives: ``"cpu"`` (host RAM), ``"disk"``, or None when everything is on the device."""
        return None

    def reserved_bytes(self) -> int:
        """Space the pipeline reserves in its lower tier (0: whatever the profile measured as free)."""
        return 0


@dataclass
class GPU(Placement):
    """Every KV block stays in GPU memory (the serving-stack default)."""

    name: ClassVar[str] = "gpu"
    summary: ClassVar[str] = "all KV on the accelerator"
    citation: ClassVar[str] = "baseline"

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {}


@dataclass
class Offload(Placement):
    """A GPU-resident share of the KV plus the rest in pinned CPU memory (or disk), prefetched per layer.

    Mechanism: blocks of ``block_size`` tokens; ``gpu_fraction`` of them stay resident (the newest first);
    the rest are copied host-to-device ``prefetch_depth`` layers ahead on a side stream. Systems: FlexGen
    (Sheng et al., ICML 2023), vLLM/LMCache CPU offload, SGLang HiCache. Deviations: the cost model charges
    only the copy time not hidden behind attention of the same step (``max(0, copy - compute)`` per layer,
    divided by the prefetch depth's overlap); the copy rate comes from the hardware profile (measured on a
    GPU, datasheet otherwise, which the report says). Disk tier (KV beyond host RAM, as LMCache's local-disk
    backend): the non-resident blocks are read from disk at the profile's measured rate. Tier sizes and rates
    come from the hardware profile only (:mod:`kvtune.measure.tiers`), never from the pipeline.
    Parameters: ``tier`` cpu|disk; ``gpu_fraction`` 0.05..0.95; ``block_size`` 16|32|64|128 tokens;
    ``prefetch_depth`` 1..4 layers; ``host_bytes`` >= 0, the host (or disk) space reserved for the offloaded
    share, which bounds capacity too (0: what the profile measured as free).
    """

    name: ClassVar[str] = "offload"
    summary: ClassVar[str] = "GPU window + pinned CPU/disk, prefetched on a side stream"
    citation: ClassVar[str] = "Sheng et al., FlexGen, ICML 2023; vLLM/LMCache CPU offload; SGLang HiCache"

    tier: str = "cpu"
    gpu_fraction: float = 0.25
    block_size: int = 32
    prefetch_depth: int = 1
    host_bytes: int = 0  # host memory (or disk) reserved for the offloaded KV; 0 = whatever the host has

    def __post_init__(self) -> None:
        if self.tier not in ("cpu", "disk"):
            raise ValueError(f"tier must be 'cpu' or 'disk', got {self.tier!r}")
        if not 0.05 <= self.gpu_fraction <= 0.95:
            raise ValueError(f"gpu_fraction must be in [0.05, 0.95], got {self.gpu_fraction}")
        if self.block_size not in (16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 16, 32, 64, 128, got {self.block_size}")
        if not 1 <= self.prefetch_depth <= 4:
            raise ValueError(f"prefetch_depth must be in 1..4, got {self.prefetch_depth}")
        if isinstance(self.host_bytes, bool) or not isinstance(self.host_bytes, int) or self.host_bytes < 0:
            raise ValueError(f"host_bytes must be a whole number of bytes >= 0, got {self.host_bytes!r}")

    def gpu_fraction_held(self) -> float:
        return self.gpu_fraction

    def lower_tier(self) -> str | None:
        return self.tier

    def reserved_bytes(self) -> int:
        return self.host_bytes

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        tiers = tuple(getattr(scenario, "offload_tiers", ("cpu",)))
        return {
            "tier": tiers[0] if len(tiers) == 1 else trial.suggest_categorical("offload.tier", list(tiers)),
            "gpu_fraction": trial.suggest_float("offload.gpu_fraction", 0.1, 0.9, step=0.1),
            "block_size": trial.suggest_categorical("offload.block_size", [32, 64]),
            "prefetch_depth": trial.suggest_int("offload.prefetch_depth", 1, 2),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return ("gpu_fraction 0.1-0.9 (step 0.1), block_size {32, 64}, prefetch_depth 1-2, tier cpu "
                "(disk where the device memory is host RAM)")
