"""The profile document: what kvtune knows about a machine, a workload and a model.

One YAML file written by ``kvtune profile`` and read by ``kvtune recommend --profile``. Every model here is a
pydantic v2 model with ``extra="forbid"``, so a typo in a hand-edited profile is an error, not a silent default.
Units are in the field names: ``_bytes`` are bytes, ``_gbps`` are **gigabytes** per second (10^9 bytes/s, not
gigabits), ``_mhz`` megahertz, ``_w`` watts. ``docs/profile.md`` explains every field and how it is measured.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvtune.errors import UserError

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------- hardware


class GpuInfo(_Model):
    """One GPU as NVML reports it (``None``: the driver does not expose that field on this GPU)."""

    index: int
    name: str
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_used_bytes: int | None = None
    compute_capability: str | None = None  # "9.0"
    sm_count: int | None = None
    clock_sm_max_mhz: int | None = None
    clock_mem_max_mhz: int | None = None
    clock_sm_current_mhz: int | None = None
    power_limit_w: float | None = None
    pcie_gen_current: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_current: int | None = None
    pcie_width_max: int | None = None
    nvlink_links_active: int | None = None  # 0: no NVLink active; None: not reported


class BandwidthSample(_Model):
    """One copy experiment: ``repeats`` timed copies of ``size_bytes``; rates over those repeats.

    ``counted_bytes`` is what one copy moves in the rate's numerator: ``size`` for a one-way transfer,
    ``2 * size`` for a device-to-device or host memory copy (every byte is read once and written once).
    """

    kind: Literal["d2d", "h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable", "cpu_copy", "disk_read"]
    size_bytes: int
    counted_bytes: int
    repeats: int
    median_gbps: float
    min_gbps: float
    max_gbps: float
    timer: Literal["cuda_events", "perf_counter"]
    fraction_of_theoretical: float | None = None  # median / the link's theoretical rate, when one is known


class HardwareProfile(_Model):
    schema_version: int = SCHEMA_VERSION
    name: str
    source: Literal["measured", "datasheet", "this-machine"]
    accelerator: str | None = None  # name of GPU 0, None without a GPU
    gpus: list[GpuInfo] = Field(default_factory=list)
    gpu_memory_total_bytes: int | None = None  # GPU 0
    gpu_memory_free_bytes: int | None = None  # GPU 0, at probe time
    compute_capability: str | None = None
    sm_count: int | None = None
    power_limit_w: float | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # highest CUDA version the driver supports (NVML)
    torch_cuda_version: str | None = None  # CUDA runtime torch was built with
    # bandwidth summaries (GB/s): measured medians at the largest size, or datasheet figures
    hbm_bandwidth_gbps: float | None = None
    # peak dense tensor-core throughput (TFLOP/s, no sparsity), datasheet; what a compute-bound step is priced at
    peak_bf16_tflops: float | None = None
    peak_fp16_tflops: float | None = None
    h2d_pinned_gbps: float | None = None
    d2h_pinned_gbps: float | None = None
    h2d_pageable_gbps: float | None = None
    d2h_pageable_gbps: float | None = None
    host_link: str | None = None  # "PCIe Gen5 x16", "NVLink-C2C"
    host_link_theoretical_gbps: float | None = None  # one direction
    nvlink_bandwidth_gbps: float | None = None  # datasheet GPU-GPU total, when the GPU has NVLink
    bandwidth: list[BandwidthSample] = Field(default_factory=list)  # every measured point
    # host
    cpu_model: str | None = None
    cpu_cores_physical: int | None = None
    cpu_cores_logical: int | None = None
    numa_nodes: int | None = None
    cpu_ram_total_bytes: int
    cpu_ram_available_bytes: int
    cpu_memory_bandwidth_gbps: float | None = None
    cpu_matmul_gflops: float | None = None  # measured float32 matmul rate with torch's threads (CPU targets)
    offload_dir: str | None = None
    offload_fs_type: str | None = None
    disk_free_bytes: int | None = None
    disk_read_gbps: float | None = None
    disk_read_cache_dropped: bool | None = None  # True: page cache was dropped before reading (a real disk read)
    # provenance
    matches: list[str] = Field(default_factory=list)  # datasheet profiles: lower-case substrings of NVML GPU names
    sources: dict[str, str] = Field(default_factory=dict)  # field -> datasheet / measurement citation
    notes: list[str] = Field(default_factory=list)
    probe_seconds: float | None = None

    def kv_memory_budget(self, weights_bytes: int, memory_fraction: float = 0.9) -> int:
        """Bytes left for the KV cache: GPU total * fraction - weights (no GPU: available RAM), floored at 0."""
        if not 0 < memory_fraction <= 1:
            raise UserError(f"memory fraction {memory_fraction}: expected a value in (0, 1]")
        base = self.gpu_memory_total_bytes if self.gpu_memory_total_bytes else self.cpu_ram_available_bytes
        return max(0, int(base * memory_fraction) - int(weights_bytes))

    def host_link_gbps(self) -> float | None:
        """Host-to-device rate offloaded KV is fetched at: measured pinned H2D; for a datasheet profile, which
        has no measurement, the link's theoretical per-direction rate (an upper bound)."""
        if self.h2d_pinned_gbps is not None:
            return self.h2d_pinned_gbps
        return self.host_link_theoretical_gbps if self.source == "datasheet" else None


# --------------------------------------------------------------------------------------------- workload


class HistogramBucket(_Model):
    lo: int  # inclusive
    hi: int  # exclusive
    count: int


class LengthStats(_Model):
    """A distribution of non-negative integers (token counts, turns). Percentiles are nearest-rank."""

    count: int
    mean: float
    min: int
    p50: int
    p90: int
    p99: int
    max: int
    histogram: list[HistogramBucket] = Field(default_factory=list)  # power-of-two buckets, empty ones left out


class MalformedRow(_Model):
    file: str
    line: int
    reason: str


class TraceSource(_Model):
    path: str
    format: str
    requests: int
    malformed_rows: int
    span_s: float | None = None


class WorkloadProfile(_Model):
    schema_version: int = SCHEMA_VERSION
    name: str
    source: str
    format: str
    requests: int
    input_tokens: LengthStats
    output_tokens: LengthStats
    total_tokens: LengthStats
    time_span_s: float | None = None
    arrival_rate_per_s: float | None = None
    interarrival_cv: float | None = None  # coefficient of variation of gaps; 1 = Poisson, >1 = bursty
    sessions: int | None = None
    turns_per_session: LengthStats | None = None
    prefix_reuse_ratio: float | None = None  # input tokens a prefix cache could serve / all input tokens
    prefix_reuse_method: str | None = None
    token_counts: Literal["trace", "tokenizer", "estimated"] = "trace"
    percentile_relative_error: float = 0.0  # bound on |reported - exact| / exact for every percentile
    malformed_rows: int = 0
    malformed_examples: list[MalformedRow] = Field(default_factory=list)
    traces: list[TraceSource] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------- model


class ModelRecord(_Model):
    name: str
    source: str
    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    dtype: str
    sliding_window: int | None = None
    sliding_layers: int = 0
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    params: int | None = None
    weights_bytes: int | None = None
    kv_bytes_per_token: float  # uncompressed, the spec's dtype


class CapacityRow(_Model):
    codec: str  # "fp16", "fp8-e4m3", "kivi-4b"
    method: str
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    bytes_per_token: float  # all layers, K+V, scales included
    bytes_per_sequence_mean: float  # averaged over the workload's total-length distribution
    sequences_at_mean: int  # concurrent sequences of the workload mix that fit
    sequences_at_p50: int
    sequences_at_p99: int
    max_tokens_one_sequence: int | None  # longest single sequence the budget holds; None: no limit (all layers slide)


class CapacityTable(_Model):
    hardware: str
    workload: str
    memory_fraction: float
    weights_bytes: int
    kv_budget_bytes: int
    budget_basis: Literal["gpu", "cpu-ram"]
    length_p50: int
    length_p99: int
    bytes_source: str  # "kvtune.strategies.codec_bytes_per_token" or "kvtune.profile analytic fallback"
    rows: list[CapacityRow]
    notes: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------- document


class Profile(_Model):
    schema_version: int = SCHEMA_VERSION
    kvtune_version: str
    created: str  # ISO 8601, UTC
    hardware: HardwareProfile
    workload: WorkloadProfile | None = None
    model: ModelRecord | None = None
    capacity: CapacityTable | None = None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "document"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"field {loc}: {err['msg']}{more}"


def profile_from_dict(data: object, where: str) -> Profile:
    """Validate a loaded document; ``where`` names it in errors."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: not a kvtune profile (expected a mapping, got {type(data).__name__})")
    version = data.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise UserError(f"{where}: schema_version {version} is newer than this kvtune reads ({SCHEMA_VERSION}); "
                        "upgrade kvtune")
    if "hardware" not in data:
        raise UserError(f"{where}: not a kvtune profile (no 'hardware' section)")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{where}: {_first_error(exc)}") from None


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile YAML; :class:`UserError` (one line, with the file) when it is not one."""
    from kvtune.io import read_yaml

    return profile_from_dict(read_yaml(path), str(path))


def dump_profile(profile: Profile) -> str:
    from kvtune.io import dump_yaml

    return dump_yaml(profile.model_dump(mode="json"))
