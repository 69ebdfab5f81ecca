"""Model arithmetic: KV bytes per token for every codec, and how many sequences fit in a memory budget.

The per-token figure of each codec comes from :func:`kvtune.strategies.codec_bytes_per_token` (the codecs'
own byte accounting, scales and KIVI's full-precision residual amortized over 4,096 tokens included). Two
corrections are applied here, because that function sees only ``layers x kv_heads x head_dim``:

* MLA (DeepSeek-V3): the spec is written as one 576-wide latent "head" shared by K and V, so the codec's
  K+V figure is halved (the element count is ``layers x 576``, not ``2 x layers x 576``).
* Sliding-window layers (Gemma-2): a sequence of L tokens holds ``min(L, window)`` tokens in those layers;
  :meth:`ModelSpec.kv_bytes_at` applies that per sequence length.

Capacity: ``budget = GPU memory x fraction - weights`` (no GPU: available RAM), and the number of concurrent
sequences is ``floor(budget / bytes of one sequence)`` at the workload's mean (averaged over its length
histogram), p50 and p99 total length. Activation workspace and paged-block rounding are not modelled: the
memory fraction is the headroom for them.
"""

from __future__ import annotations

import math

from kvtune.modelspec import ModelSpec
from kvtune.profile.schema import CapacityRow, CapacityTable, HardwareProfile, ModelRecord, WorkloadProfile

# (label, method, params): the candidates every capacity table lists, in increasing compression.
CODEC_CANDIDATES: list[tuple[str, str, dict]] = [
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("fp8-e4m3/head", "fp8", {"fmt": "e4m3", "scale": "head"}),
    ("fp8-e4m3/token", "fp8", {"fmt": "e4m3", "scale": "token"}),
    ("int8/g64", "int8", {"group_size": 64}),
    ("kivi-4b/g32", "kivi", {"bits": 4, "group_size": 32, "residual": 128}),
    ("kivi-2b/g32", "kivi", {"bits": 2, "group_size": 32, "residual": 128}),
]
BYTES_SOURCE = "kvtune.strategies.codec_bytes_per_token (tokens=4096)"


def model_record(spec: ModelSpec, weights_bytes: int | None = None) -> ModelRecord:
    return ModelRecord(
        name=spec.name, source=spec.source or "spec", layers=spec.layers, kv_heads=spec.kv_heads,
        q_heads=spec.q_heads, head_dim=spec.head_dim, dtype=spec.dtype, sliding_window=spec.sliding_window,
        sliding_layers=spec.sliding_layers(), kv_lora_rank=spec.kv_lora_rank, qk_rope_head_dim=spec.qk_rope_head_dim,
        params=spec.params, weights_bytes=weights_bytes if weights_bytes is not None else spec.weights_bytes(),
        kv_bytes_per_token=spec.kv_bytes_per_token(),
    )


def codec_bytes(method: str, params: dict, spec: ModelSpec) -> float:
    """All-layer K+V bytes per token of ``method`` for ``spec`` (MLA-corrected, see the module docstring)."""
    from kvtune.strategies import codec_bytes_per_token

    raw = codec_bytes_per_token(method, params, spec)
    if spec.is_mla:
        dense = 2 * spec.layers * spec.kv_heads * spec.head_dim * spec.dtype_bytes
        raw *= spec.kv_bytes_per_token() / dense
    return float(raw)


def _mean_sequence_bytes(spec: ModelSpec, rate: float, workload: WorkloadProfile) -> float:
    total = workload.total_tokens
    if spec.sliding_layers() == 0:
        return rate * total.mean
    # E[min(L, W)] from the power-of-two histogram (bucket midpoints); full layers use the exact mean.
    window = int(spec.sliding_window)
    n = sum(b.count for b in total.histogram) or 1
    capped = sum(b.count * min((b.lo + b.hi - 1) / 2, window) for b in total.histogram) / n
    per_layer = rate / spec.layers
    full = spec.layers - spec.sliding_layers()
    return per_layer * (full * total.mean + spec.sliding_layers() * capped)


def max_single_sequence(spec: ModelSpec, rate: float, budget: int) -> int | None:
    """Longest sequence the budget holds alone; ``None`` when every layer slides (no length limit)."""
    if rate <= 0:
        return None
    sliding = spec.sliding_layers()
    if sliding == 0:
        return int(budget // rate)
    per_layer = rate / spec.layers
    window = int(spec.sliding_window)
    full = spec.layers - sliding
    if budget < per_layer * spec.layers * window:
        return int(budget // (per_layer * spec.layers))
    if full == 0:
        return None
    return int((budget / per_layer - sliding * window) // full)


def capacity_table(spec: ModelSpec, hardware: HardwareProfile, workload: WorkloadProfile, *,
                   memory_fraction: float = 0.9, weight_bytes_per_param: float = 2.0) -> CapacityTable:
    """Concurrent sequences of ``workload`` that fit beside the weights, for each codec candidate."""
    notes: list[str] = []
    weights = spec.weights_bytes(weight_bytes_per_param)
    if weights is None:
        weights = 0
        notes.append("weights size unknown: counted as 0 bytes")
    budget = hardware.kv_memory_budget(weights, memory_fraction)
    basis = "gpu" if hardware.gpu_memory_total_bytes else "cpu-ram"
    if basis == "cpu-ram":
        notes.append("no GPU in this profile: the budget is available CPU RAM (pass --hardware NAME to plan for a GPU)")
    if budget == 0:
        notes.append("the weights alone exceed the memory budget: no sequence fits (more GPUs or quantized weights)")
    p50, p99 = workload.total_tokens.p50, workload.total_tokens.p99
    rows = []
    for label, method, params in CODEC_CANDIDATES:
        rate = codec_bytes(method, params, spec)
        mean_seq = _mean_sequence_bytes(spec, rate, workload)
        rows.append(CapacityRow(
            codec=label, method=method, params=params, bytes_per_token=round(rate, 3),
            bytes_per_sequence_mean=round(mean_seq, 1),
            sequences_at_mean=int(budget // mean_seq) if mean_seq > 0 else 0,
            sequences_at_p50=int(budget // spec.kv_bytes_at(p50, rate)) if p50 > 0 else 0,
            sequences_at_p99=int(budget // spec.kv_bytes_at(p99, rate)) if p99 > 0 else 0,
            max_tokens_one_sequence=max_single_sequence(spec, rate, budget),
        ))
    if spec.is_mla:
        notes.append("MLA: one latent per layer shared by K and V; codec figures scaled to its element count")
    if spec.sliding_layers():
        notes.append(f"{spec.sliding_layers()} of {spec.layers} layers keep only the last {spec.sliding_window} "
                     "tokens; the mean uses the length histogram's bucket midpoints for those layers")
    return CapacityTable(
        hardware=hardware.name, workload=workload.name, memory_fraction=memory_fraction, weights_bytes=int(weights),
        kv_budget_bytes=int(budget), budget_basis=basis, length_p50=p50, length_p99=p99, bytes_source=BYTES_SOURCE,
        rows=rows, notes=notes,
    )


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_tokens(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M".replace(".0M", "M")
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    if n >= 1000:
        return f"{n / 1e3:.1f}k".replace(".0k", "k")
    return f"{n:.0f}" if math.isfinite(n) else "-"
