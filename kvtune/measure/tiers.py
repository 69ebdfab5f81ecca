"""Where KV can live and how fast it moves: every placement rule in one place.

A deployment has up to three memory tiers, each bounded by what the hardware profile knows:

* **device pool** — GPU memory x the serving memory fraction, minus the weights. On a host without an
  accelerator the model and its KV live in host RAM, so the pool is the available RAM x the fraction, minus the
  weights, and there is no separate host tier.
* **host tier** (accelerator hosts only) — the host's available RAM x :data:`HOST_FRACTION`. A datasheet GPU
  profile has no host, so the host is the machine kvtune runs on (the profile says so).
* **disk tier** — the free space of the offload folder x :data:`DISK_FRACTION`, read at the measured
  sequential rate. A profile that did not measure the disk has no disk tier (``kvtune profile`` measures it).

Rates into the device: the host tier over the host link (measured pinned host-to-device rate, or the
datasheet's theoretical link rate for a datasheet profile); the disk tier at ``min(link, disk read)`` on an
accelerator host and at the disk read rate on a CPU-only host. A pipeline never sets a rate.

What prefetch hides: the copy of the non-resident KV for a decode step runs on a side stream while the step
computes (weights and resident KV); only the part longer than that compute is exposed:
``exposed = max(0, copy - compute)`` (:func:`exposed_copy_ms`). The compute it hides behind is the *target's*
step time from the serving model, never a CPU reference-path timing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtune.measure.figure import Figure

MEMORY_FRACTION = 0.9  # of device memory a serving stack may use (vLLM's gpu_memory_utilization default)
HOST_FRACTION = 0.9  # of available host RAM an offload tier may use
DISK_FRACTION = 0.9  # of free disk an offload tier may use
ASSUMED_DISK_GBPS = 2.0  # only for a profile that measured free disk but not its rate (conservative NVMe read)


@dataclass(frozen=True)
class Tier:
    name: str  # "device" | "host" | "disk"
    capacity: Figure | None  # bytes; None: this tier is not available (the reason says why)
    read_gbps: Figure | None  # rate into the device; None for the device pool itself
    reason: str = ""  # why it is unavailable

    @property
    def available(self) -> bool:
        return self.capacity is not None


def _label(hw: Any) -> str:
    return "assumed" if hw.source == "datasheet" else "measured"


@dataclass(frozen=True)
class Tiers:
    """The tiers of one hardware profile, with the weights already taken out of the device pool."""

    accelerator: bool
    device: Tier
    host: Tier
    disk: Tier
    hardware: str

    @classmethod
    def from_hardware(cls, hw: Any, weights_bytes: int, memory_fraction: float = MEMORY_FRACTION) -> "Tiers":
        name = hw.name
        accel = bool(hw.accelerator)
        budget = hw.kv_memory_budget(weights_bytes, memory_fraction)
        if accel:
            basis = (f"{name}: GPU memory x {memory_fraction:g} - weights "
                     f"({'datasheet' if hw.source == 'datasheet' else 'NVML'})")
        else:
            basis = f"{name}: available RAM x {memory_fraction:g} - weights (measured)"
        device = Tier("device", Figure(budget, _label(hw), basis), None)

        link = hw.host_link_gbps() if accel else None
        link_fig = None
        if link:
            measured = hw.h2d_pinned_gbps is not None
            link_fig = Figure(link, "measured" if measured else "assumed",
                              f"{name}: pinned host-to-device copy (measured)" if measured
                              else f"{name}: {hw.host_link or 'host link'} theoretical rate (datasheet)")
        if accel and hw.cpu_ram_available_bytes:
            who = "this machine (a datasheet GPU has no host)" if hw.source == "datasheet" else name
            if link_fig is None:
                host = Tier("host", None, None, f"{name}: no host-to-device rate known (run kvtune profile)")
            else:
                host = Tier("host", Figure(int(hw.cpu_ram_available_bytes * HOST_FRACTION), "measured",
                                           f"{who}: available RAM x {HOST_FRACTION:g}"), link_fig)
        elif accel:
            host = Tier("host", None, None, f"{name}: available host RAM unknown (run kvtune profile)")
        else:
            host = Tier("host", None, None, f"{name} has no accelerator: the KV already lives in host RAM")

        if hw.disk_free_bytes is None:
            disk = Tier("disk", None, None, f"{name}: free disk not measured (run kvtune profile)")
        else:
            if hw.disk_read_gbps:
                rate = Figure(hw.disk_read_gbps, "measured", f"{hw.offload_dir or 'offload folder'}: sequential read")
            else:
                rate = Figure(ASSUMED_DISK_GBPS, "assumed", "conservative NVMe sequential read (disk rate not measured)")
            if link_fig is not None and link_fig.value < rate.value:
                rate = Figure(link_fig.value, link_fig.source, f"{link_fig.basis} (slower than the disk)")
            disk = Tier("disk", Figure(int(hw.disk_free_bytes * DISK_FRACTION), "measured",
                                       f"{hw.offload_dir or 'offload folder'}: free space x {DISK_FRACTION:g}"), rate)
        return cls(accelerator=accel, device=device, host=host, disk=disk, hardware=name)

    def lower(self, placement: Any) -> Tier | None:
        """The tier holding a placement's non-resident share (None for an all-device placement).

        On a host without an accelerator, ``tier: cpu`` would be the device pool itself: it maps to the disk.
        """
        where = placement.lower_tier()
        if where is None:
            return None
        if where == "cpu" and self.accelerator:
            return self.host
        return self.disk

    def lower_capacity(self, placement: Any) -> float | None:
        """Bytes the placement's lower tier may hold: the tier's size, capped by what the pipeline reserves."""
        tier = self.lower(placement)
        if tier is None or tier.capacity is None:
            return None
        reserved = placement.reserved_bytes()
        return float(min(tier.capacity.value, reserved) if reserved else tier.capacity.value)

    def sequences(self, placement: Any, seq_bytes: float, spill_bytes: float = 0.0) -> tuple[int, str]:
        """How many sequences of ``seq_bytes`` of stored KV fit, and which tier bounds them. The placement's
        resident share goes to the device pool, the rest to its lower tier; ``spill_bytes`` per sequence (a
        spilling selector's host copy of every token) to the host tier — on a host without an accelerator
        that is the device pool itself."""
        share = placement.gpu_fraction_held()
        on_dev = seq_bytes * share + (0.0 if self.accelerator else spill_bytes)
        dev = self.device.capacity.value if self.device.capacity else 0
        best, why = (int(dev // on_dev) if on_dev > 0 else 10**9), "device pool"
        lower = self.lower(placement)
        if lower is not None and share < 1.0 and seq_bytes * (1.0 - share) > 0:
            n = int((self.lower_capacity(placement) or 0) // (seq_bytes * (1.0 - share)))
            if n < best:
                best, why = n, f"{lower.name} tier"
        if self.accelerator and spill_bytes > 0:
            host = self.host.capacity.value if self.host.capacity else 0
            n = int(host // spill_bytes)
            if n < best:
                best, why = n, "host tier (spilled tokens)"
        return max(0, best), why

    def check(self, placement: Any, device_bytes: float, lower_bytes: float) -> str | None:
        """Why one sequence's KV (``device_bytes`` on the device, ``lower_bytes`` below) cannot be placed, or None."""
        budget = self.device.capacity.value if self.device.capacity else 0
        if device_bytes > budget:
            return (f"one sequence needs {device_bytes / 2**30:.2f} GiB of KV on the device; the device pool holds "
                    f"{budget / 2**30:.2f} GiB ({self.device.capacity.basis if self.device.capacity else 'none'})")
        tier = self.lower(placement)
        if tier is None or lower_bytes <= 0:
            return None
        if not tier.available:
            return f"offload to {tier.name}: {tier.reason}"
        cap = self.lower_capacity(placement) or 0.0
        if lower_bytes > cap:
            return (f"one sequence needs {lower_bytes / 2**30:.2f} GiB in the {tier.name} tier, which holds "
                    f"{cap / 2**30:.2f} GiB ({tier.capacity.basis if tier.capacity else ''})")
        return None


def copy_ms(nbytes: float, rate: Figure) -> float:
    """Time to move ``nbytes`` into the device at ``rate`` (GB/s)."""
    return nbytes / (rate.value * 1e9) * 1e3


def exposed_copy_ms(copy: float, compute: float) -> float:
    """The copy time prefetch cannot hide behind a step's compute (see the module docstring)."""
    return max(0.0, copy - compute)
