"""Placement (hybrid memory): where the stored KV lives. Never changes numerics, only bytes and time.

``gpu`` keeps every block on the accelerator. ``offload`` keeps a fraction of each sequence's KV blocks on the
GPU and the rest in pinned host memory (or on disk), fetching the non-resident blocks for each decode step on
a side stream, one or more layers ahead (prefetch), so that the copy overlaps the attention of the layer
before. Its cost is the host-to-device time per step that the overlap does not hide.
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

    def exposed_transfer_ms(self, offloaded_bytes_per_step: float, link_gbps: float, compute_ms: float) -> float:
        return 0.0


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
    GPU, datasheet otherwise, which the report says).
    Disk tier (KV beyond host RAM, as LMCache's local-disk backend): the non-resident blocks are read from
    disk, so the copy runs at ``min(link, disk_gbps)``; ``disk_gbps`` defaults to a PCIe 4.0 NVMe datasheet
    sequential-read figure (7 GB/s), not a measurement; a profile's measured disk rate should be passed in.
    Parameters: ``tier`` cpu|disk; ``gpu_fraction`` 0.05..0.95; ``block_size`` 16|32|64|128 tokens;
    ``prefetch_depth`` 1..4 layers; ``disk_gbps`` > 0 (disk tier only); ``host_bytes`` >= 0, the host (or disk)
    space for the offloaded share, which bounds capacity too (0: the host's available RAM, disk: unbounded).
    """

    name: ClassVar[str] = "offload"
    summary: ClassVar[str] = "GPU window + pinned CPU/disk, prefetched on a side stream"
    citation: ClassVar[str] = "Sheng et al., FlexGen, ICML 2023; vLLM/LMCache CPU offload; SGLang HiCache"

    tier: str = "cpu"
    gpu_fraction: float = 0.25
    block_size: int = 32
    prefetch_depth: int = 1
    disk_gbps: float = 7.0
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
        if isinstance(self.disk_gbps, bool) or not isinstance(self.disk_gbps, (int, float)) or self.disk_gbps <= 0:
            raise ValueError(f"disk_gbps must be a positive number (GB/s), got {self.disk_gbps!r}")

    def copy_gbps(self, link_gbps: float) -> float:
        """The rate the non-resident blocks arrive at: the host link, or the disk when it is slower."""
        return min(link_gbps, float(self.disk_gbps)) if self.tier == "disk" else link_gbps

    def gpu_fraction_held(self) -> float:
        return self.gpu_fraction

    def exposed_transfer_ms(self, offloaded_bytes_per_step: float, link_gbps: float, compute_ms: float) -> float:
        copy_ms = offloaded_bytes_per_step / (self.copy_gbps(link_gbps) * 1e9) * 1e3
        # deeper prefetch gives the copy more layers of compute to hide behind
        return max(0.0, copy_ms - compute_ms * self.prefetch_depth)

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
