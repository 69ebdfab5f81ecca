"""The profile document: what kvtune knows about a machine, a workload and a model.

One YAML file written by ``kvtune profile`` and read by ``kvtune recommend --profile``. Every model here is a
pydantic v2 model with ``extra="forbid"``, so a typo in a hand-edited profile is an error, not a silent default.
Units are in the field names: ``_bytes`` are bytes, ``_gbps`` are **gigabytes** per second (10^9 bytes/s, not
gigabits), ``_mhz`` megahertz, ``_w`` watts. ``docs/profile.md`` explains every field and how it is measured.

Every number is constrained where it is declared (the aliases below): finite (no ``.inf``/``.nan`` in YAML),
non-negative, and below a generous physical ceiling, so a hand-edited or fuzzed profile fails to load with one
line naming the field instead of turning into an infinite rate or a division by zero downstream. Rates a
serving model divides by (bandwidths, TFLOP/s) must be positive; fractions and ratios lie in [0, 1]; length
statistics must be ordered (``min <= p50 <= p90 <= p99 <= max``).
"""

from __future__ import annotations

import datetime as _dt
import os
import stat
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvtune.errors import UserError, printable

SCHEMA_VERSION = 1

# Number types, one place. The ceilings are far above any real machine or trace, below where arithmetic on
# them could overflow or lose meaning: 2^62 bytes (4 EiB), 10^6 GB/s, 10^6 TFLOP/s, 2^40 tokens.
MAX_BYTES = 1 << 62
MAX_GBPS = 1e6
MAX_TFLOPS = 1e6
MAX_TOKENS = 1 << 40
MAX_SECONDS = 1e15  # time spans: summed over several traces; finite is what matters
MAX_RATE_PER_S = 1e12  # arrival rate: a trace claiming more has timestamps finer than it can resolve

Bytes = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Count = Annotated[int, Field(ge=0, le=MAX_TOKENS)]  # rows, tokens, turns, sequences
Small = Annotated[int, Field(ge=0, le=1 << 20)]  # indices, SM counts, lanes, links, layers, heads
Positive = Annotated[int, Field(ge=1, le=1 << 20)]
Mhz = Annotated[int, Field(ge=0, le=100_000)]
Gbps = Annotated[float, Field(gt=0, le=MAX_GBPS, allow_inf_nan=False)]  # a rate something is divided by
GbpsSample = Annotated[float, Field(ge=0, le=MAX_GBPS, allow_inf_nan=False)]  # a measured rate (rounded)
Tflops = Annotated[float, Field(gt=0, le=MAX_TFLOPS, allow_inf_nan=False)]
Watts = Annotated[float, Field(ge=0, le=1e5, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, le=float(MAX_BYTES), allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Version = Annotated[int, Field(ge=1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------- hardware


class GpuInfo(_Model):
    """One GPU as NVML reports it (``None``: the driver does not expose that field on this GPU)."""

    index: Small
    name: str
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total_bytes: Bytes | None = None
    memory_free_bytes: Bytes | None = None
    memory_used_bytes: Bytes | None = None
    compute_capability: str | None = None  # "9.0"
    sm_count: Small | None = None
    clock_sm_max_mhz: Mhz | None = None
    clock_mem_max_mhz: Mhz | None = None
    clock_sm_current_mhz: Mhz | None = None
    power_limit_w: Watts | None = None
    pcie_gen_current: Small | None = None
    pcie_gen_max: Small | None = None
    pcie_width_current: Small | None = None
    pcie_width_max: Small | None = None
    nvlink_links_active: Small | None = None  # 0: no NVLink active; None: not reported


class BandwidthSample(_Model):
    """One copy experiment: ``repeats`` timed copies of ``size_bytes``; rates over those repeats.

    ``counted_bytes`` is what one copy moves in the rate's numerator: ``size`` for a one-way transfer,
    ``2 * size`` for a device-to-device or host memory copy (every byte is read once and written once).
    """

    kind: Literal["d2d", "h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable", "cpu_copy", "disk_read"]
    size_bytes: Annotated[int, Field(ge=1, le=MAX_BYTES)]
    counted_bytes: Annotated[int, Field(ge=1, le=MAX_BYTES)]
    repeats: Annotated[int, Field(ge=1, le=1 << 30)]
    median_gbps: GbpsSample
    min_gbps: GbpsSample
    max_gbps: GbpsSample
    timer: Literal["cuda_events", "perf_counter"]
    fraction_of_theoretical: Annotated[float, Field(ge=0, le=1e3, allow_inf_nan=False)] | None = None  # median / the link's theoretical rate, when one is known


class HardwareProfile(_Model):
    schema_version: Version = SCHEMA_VERSION
    name: str
    source: Literal["measured", "datasheet", "this-machine"]
    accelerator: str | None = None  # name of GPU 0, None without a GPU
    gpus: list[GpuInfo] = Field(default_factory=list)
    gpu_memory_total_bytes: Bytes | None = None  # GPU 0
    gpu_memory_free_bytes: Bytes | None = None  # GPU 0, at probe time
    compute_capability: str | None = None
    sm_count: Small | None = None
    power_limit_w: Watts | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # highest CUDA version the driver supports (NVML)
    torch_cuda_version: str | None = None  # CUDA runtime torch was built with
    # bandwidth summaries (GB/s): measured medians at the largest size, or datasheet figures
    hbm_bandwidth_gbps: Gbps | None = None
    # peak dense tensor-core throughput (TFLOP/s, no sparsity), datasheet; what a compute-bound step is priced at
    peak_bf16_tflops: Tflops | None = None
    peak_fp16_tflops: Tflops | None = None
    h2d_pinned_gbps: Gbps | None = None
    d2h_pinned_gbps: Gbps | None = None
    h2d_pageable_gbps: Gbps | None = None
    d2h_pageable_gbps: Gbps | None = None
    host_link: str | None = None  # "PCIe Gen5 x16", "NVLink-C2C"
    host_link_theoretical_gbps: Gbps | None = None  # one direction
    nvlink_bandwidth_gbps: Gbps | None = None  # datasheet GPU-GPU total, when the GPU has NVLink
    bandwidth: list[BandwidthSample] = Field(default_factory=list)  # every measured point
    # host
    cpu_model: str | None = None
    cpu_cores_physical: Positive | None = None
    cpu_cores_logical: Positive | None = None
    numa_nodes: Positive | None = None
    cpu_ram_total_bytes: Bytes  # 0 in a datasheet profile (filled from this machine when loaded)
    cpu_ram_available_bytes: Bytes
    cpu_memory_bandwidth_gbps: Gbps | None = None
    cpu_matmul_gflops: Annotated[float, Field(gt=0, le=MAX_TFLOPS * 1e3, allow_inf_nan=False)] | None = None  # measured float32 matmul rate with torch's threads (CPU targets)
    offload_dir: str | None = None
    offload_fs_type: str | None = None
    disk_free_bytes: Bytes | None = None
    disk_read_gbps: Gbps | None = None
    disk_read_cache_dropped: bool | None = None  # True: page cache was dropped before reading (a real disk read)
    # provenance
    matches: list[str] = Field(default_factory=list)  # datasheet profiles: lower-case substrings of NVML GPU names
    sources: dict[str, str] = Field(default_factory=dict)  # field -> datasheet / measurement citation
    notes: list[str] = Field(default_factory=list)
    probe_seconds: Seconds | None = None

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
    lo: Count  # inclusive
    hi: Count  # exclusive
    count: Count

    @model_validator(mode="after")
    def _ordered(self) -> "HistogramBucket":
        if self.hi <= self.lo:
            raise ValueError(f"bucket [{self.lo}, {self.hi}) is empty (hi must be above lo)")
        return self


class LengthStats(_Model):
    """A distribution of non-negative integers (token counts, turns). Percentiles are nearest-rank."""

    count: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    mean: Annotated[float, Field(ge=0, le=float(MAX_TOKENS), allow_inf_nan=False)]
    min: Count
    p50: Count
    p90: Count
    p99: Count
    max: Count
    histogram: list[HistogramBucket] = Field(default_factory=list)  # power-of-two buckets, empty ones left out

    @model_validator(mode="after")
    def _ordered(self) -> "LengthStats":
        if not self.min <= self.p50 <= self.p90 <= self.p99 <= self.max:
            raise ValueError(f"statistics out of order (min {self.min}, p50 {self.p50}, p90 {self.p90}, "
                             f"p99 {self.p99}, max {self.max}): expected min <= p50 <= p90 <= p99 <= max")
        if not self.min - 1e-3 <= self.mean <= self.max + 1e-3:  # the mean is rounded to 3 decimals
            raise ValueError(f"mean {self.mean} is outside [min {self.min}, max {self.max}]")
        if self.histogram and sum(b.count for b in self.histogram) != self.count:
            raise ValueError(f"histogram counts sum to {sum(b.count for b in self.histogram)}, not count {self.count}")
        return self


class MalformedRow(_Model):
    file: str
    line: Count
    reason: str


class TraceSource(_Model):
    path: str
    format: str
    requests: Count
    malformed_rows: Count
    span_s: Seconds | None = None


class WorkloadProfile(_Model):
    schema_version: Version = SCHEMA_VERSION
    name: str
    source: str
    format: str
    requests: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    input_tokens: LengthStats
    output_tokens: LengthStats
    total_tokens: LengthStats
    time_span_s: Seconds | None = None
    arrival_rate_per_s: Annotated[float, Field(gt=0, le=MAX_RATE_PER_S, allow_inf_nan=False)] | None = None
    interarrival_cv: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] | None = None  # 1 = Poisson
    sessions: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    turns_per_session: LengthStats | None = None
    prefix_reuse_ratio: Fraction | None = None  # input tokens a prefix cache could serve / all input tokens
    prefix_reuse_method: str | None = None
    token_counts: Literal["trace", "tokenizer", "estimated"] = "trace"
    percentile_relative_error: Fraction = 0.0  # bound on |reported - exact| / exact; 0: exact (value counts)
    malformed_rows: Count = 0
    malformed_examples: list[MalformedRow] = Field(default_factory=list)
    traces: list[TraceSource] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------- model


class ModelRecord(_Model):
    name: str
    source: str
    layers: Positive
    kv_heads: Positive
    q_heads: Positive
    head_dim: Positive
    dtype: str
    sliding_window: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    sliding_layers: Small = 0
    kv_lora_rank: Positive | None = None
    qk_rope_head_dim: Small | None = None
    params: Annotated[int, Field(ge=0, le=1 << 50)] | None = None
    weights_bytes: Bytes | None = None
    kv_bytes_per_token: Annotated[float, Field(gt=0, le=float(MAX_BYTES), allow_inf_nan=False)]  # uncompressed


class CapacityRow(_Model):
    codec: str  # "fp16", "fp8-e4m3", "kivi-4b"
    method: str
    params: dict[str, str | int | FiniteFloat | bool] = Field(default_factory=dict)
    bytes_per_token: NonNegFloat  # all layers, K+V, scales included
    bytes_per_sequence_mean: NonNegFloat  # averaged over the workload's total-length distribution
    sequences_at_mean: Annotated[int, Field(ge=0, le=MAX_BYTES)]  # concurrent sequences of the workload mix that fit
    sequences_at_p50: Annotated[int, Field(ge=0, le=MAX_BYTES)]
    sequences_at_p99: Annotated[int, Field(ge=0, le=MAX_BYTES)]
    max_tokens_one_sequence: Annotated[int, Field(ge=0, le=MAX_BYTES)] | None  # longest single sequence the budget holds; None: no limit (all layers slide)


class CapacityTable(_Model):
    hardware: str
    workload: str
    memory_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    weights_bytes: Bytes
    kv_budget_bytes: Bytes
    budget_basis: Literal["gpu", "cpu-ram"]
    length_p50: Count
    length_p99: Count
    bytes_source: str  # "kvtune.strategies.codec_bytes_per_token" or "kvtune.profile analytic fallback"
    rows: list[CapacityRow]
    notes: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------- document


class Profile(_Model):
    schema_version: Version = SCHEMA_VERSION
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
    loc = printable(".".join(str(p) for p in err["loc"]) or "document", 120)  # keys come from the input
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"field {loc}: {printable(err['msg'], 200)}{more}"


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

    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # missing or unreadable: read_yaml says which
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise UserError(f"{printable(path)}: is not a regular file (a FIFO, socket or device would block or never "
                        "end); save the profile to a file first")
    return profile_from_dict(read_yaml(path), printable(path))


def dump_profile(profile: Profile) -> str:
    from kvtune.io import dump_yaml

    return dump_yaml(profile.model_dump(mode="json"))
