"""Kernel cost of a pipeline: the bytes its stored form really holds at the target's shapes, and (only when the
kernels run on the target device itself) its decode-attention time.

* **bytes per token** — a layer's store is filled with ``kept`` tokens (the selector's budget of the context,
  per layer where budgets differ) and encoded by that layer's codec; the ``nbytes()`` of every layer (measured
  from the stored tensors, scales and residual included), summed, divided by the *context* length. Layers that
  are alike are measured once. Eviction and compression both show. Per-head budgets (Ada-KV) are measured at
  their uniform mean.
* **capacity** — sequences of the context length whose KV fits the memory tiers (:mod:`kvtune.measure.tiers`):
  the device pool for the resident share, the host or disk tier for an offloaded share.
* **decode attention time** — one decode step's attention for one sequence through the store's ``attend``
  (the kernels' dispatch), timed with :mod:`kvtune.measure.timing` interleaved with the full cache so the
  ratio is fair on a noisy machine. Only when ``CostSetup.time_kernels`` (the target is the device the kernels
  run on); a CPU reference-path timing is never recorded as the cost of a GPU target. What a deployment pays
  per step (weights, KV reads at batch, offload copies) is the serving model's (:mod:`kvtune.measure.serving`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtune.kernels.backend import resolve
from kvtune.measure.tiers import Tiers
from kvtune.measure.timing import time_pair_ms

from kvtune.modelspec import ModelSpec
from kvtune.pipeline import CostResult
from kvtune.strategies import Stages, build

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CostSetup:
    spec: ModelSpec  # the target model's shapes
    context_tokens: int
    tiers: Tiers  # the target's memory tiers (device pool, host, disk)
    device: str = "cpu"  # where the kernels run
    time_kernels: bool = False  # the target is the device the kernels run on: time decode attention
    repeats: int = 7
    warmup: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.spec.dtype]

    @property
    def memory_budget_bytes(self) -> int:
        cap = self.tiers.device.capacity
        return int(cap.value) if cap is not None else 0


def backend_label(device: str) -> str:
    return f"{resolve(None, device).value}-{'cuda' if device.startswith('cuda') else 'cpu'}"


def _random_kv(spec: ModelSpec, tokens: int, dtype: torch.dtype, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (1, spec.kv_heads, tokens, spec.head_dim)  # (B, H, T, D)
    k = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return k, v


def layer_groups(stages: Stages, spec: ModelSpec, ctx: int) -> list[tuple[int, Any, int]]:
    """Layers with the same (kept tokens, codec) measured once: ``[(kept, layer codec, layer count), ...]``.

    Per-layer budgets (PyramidKV) and per-layer codecs (mixed) make layers differ; a uniform pipeline is one
    group of ``spec.layers`` layers.
    """
    sel, codec = stages.selector, stages.codec
    groups: dict[tuple[int, str], list] = {}
    for i in range(spec.layers):
        kept = sel.layer_keep(ctx, i, spec.layers) if sel is not None else ctx
        layer_codec = codec.layer_codec(i, spec.layers) if hasattr(codec, "layer_codec") else codec
        key = (kept, repr(layer_codec))
        if key not in groups:
            groups[key] = [kept, layer_codec, 0]
        groups[key][2] += 1
    return [tuple(g) for g in groups.values()]  # type: ignore[misc]


def _filled(codec: Any, k: torch.Tensor, v: torch.Tensor, kept: int):
    store = codec.new_store()
    store.append(k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous())
    return store


def measure_cost(stages: Stages, setup: CostSetup, seed: int = 0) -> CostResult:
    """Measure one pipeline's cost (see the module docstring)."""
    spec, ctx, dtype, dev = setup.spec, setup.context_tokens, setup.dtype, setup.device
    sel = stages.selector
    # Bytes: stores encoded in the target KV dtype. Timing: the same stores in the compute dtype, which is the
    # target dtype on a GPU and float32 on a CPU (CPUs emulate fp16 arithmetic; timing it would measure that).
    compute_dtype = dtype if dev.startswith("cuda") else torch.float32
    k, v = _random_kv(spec, ctx, dtype, dev, seed)
    full_layer_bytes = _filled(build("codec", "fp16", {}), k, v, ctx).nbytes()
    groups = layer_groups(stages, spec, ctx)
    total_bytes = sum(count * _filled(layer_codec, k, v, kept).nbytes() for kept, layer_codec, count in groups)
    notes = list(setup.notes)
    latency = latency_full = None
    if setup.time_kernels:
        latency, latency_full = _attention_ms(stages, setup, groups, compute_dtype, seed)
        if compute_dtype != dtype:
            notes.append(f"attention timed in float32 on the CPU reference path; bytes in {spec.dtype}")
    bytes_per_token = total_bytes / ctx
    full_bpt = spec.layers * full_layer_bytes / ctx
    host_codec = sel.host_codec_name() if sel is not None else None
    host_bpt = spec.layers * _filled(build("codec", host_codec, {}), k, v, ctx).nbytes() / ctx if host_codec else 0.0
    return CostResult(
        bytes_per_token=round(bytes_per_token, 3),
        bytes_per_token_full=round(full_bpt, 3),
        compression_ratio=round(full_bpt / bytes_per_token, 4) if bytes_per_token else math.inf,
        decode_latency_ms=latency,
        decode_latency_full_ms=latency_full,
        context_tokens=ctx,
        host_bytes_per_token=round(host_bpt, 3),
        capacity_seqs=capacity(setup.tiers, stages.placement, bytes_per_token * ctx, host_bpt * ctx),
        capacity_full_seqs=capacity(setup.tiers, build("placement", "gpu", {}), full_bpt * ctx),
        memory_budget_bytes=setup.memory_budget_bytes,
        backend=backend_label(dev),
        device=device_name(dev),
        notes=notes,
    )


def capacity(tiers: Tiers, placement: Any, seq_bytes: float, spill_bytes: float = 0.0) -> int:
    """Sequences of ``seq_bytes`` of KV that fit: the resident share in the device pool, the rest in the
    placement's lower tier (an unavailable lower tier holds nothing); ``spill_bytes`` per sequence in host memory
    (a spilling selector), on a CPU-only host in the device pool itself."""
    n, _ = tiers.sequences(placement, seq_bytes, spill_bytes)
    return n


def _attention_ms(stages: Stages, setup: CostSetup, groups: list, compute_dtype: torch.dtype,
                  seed: int) -> tuple[float, float]:
    """One decode step's attention over all layers for one sequence: (candidate ms, full cache ms)."""
    spec, ctx, dev = setup.spec, setup.context_tokens, setup.device
    kc, vc = _random_kv(spec, ctx, compute_dtype, dev, seed)
    full = _filled(build("codec", "fp16", {}), kc, vc, ctx)
    q = torch.randn((1, spec.q_heads, spec.head_dim), generator=torch.Generator().manual_seed(seed + 1))
    q = q.to(dev, compute_dtype)
    scale = spec.head_dim**-0.5
    probs = stages.selector is not None and stages.selector.decode_time
    cand_ms = full_ms = 0.0
    for kept, layer_codec, count in groups:
        store = _filled(layer_codec, kc, vc, kept)
        cand, ref = time_pair_ms(lambda: store.attend(q, scale, return_probs=probs),  # noqa: B023
                                 lambda: full.attend(q, scale), dev, repeats=setup.repeats, warmup=setup.warmup)
        cand_ms += count * cand
        full_ms += count * ref
    return round(cand_ms, 4), round(full_ms, 4)


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
