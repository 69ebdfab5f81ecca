"""Cost of a pipeline: bytes held, decode-step attention latency, capacity, offload transfer time.

Everything is measured on the candidate's stored form at the *target* model's shapes (layers, KV heads, head
dim, KV dtype) and at the workload's context length:

* **bytes per token** — a layer's store is filled with ``kept`` tokens (the selector's budget of the context,
  per layer where budgets differ) and encoded by that layer's codec; the ``nbytes()`` of every layer (measured
  from the stored tensors, scales and residual included), summed, divided by the *context* length. Layers that
  are alike are measured once. Eviction and compression both show. Per-head budgets (Ada-KV) are measured at
  their uniform mean.
* **decode latency** — one decode step's attention for one sequence: the store's ``attend`` (the kernels'
  dispatch: Triton on a GPU, the PyTorch reference on a CPU), median of repeats after warm-up, summed over
  the layers (one timing per group of alike layers keeps big targets within memory). The full
  cache is timed in the same run, interleaved, so the ratio is fair on a noisy machine.
* **capacity** — sequences of the context length whose GPU-resident KV fits in the memory budget.
* **transfer** — for offload placements: the host-to-device copy per decode step that prefetch does not hide
  behind the full cache's attention time, from the hardware profile's link rate (measured on a GPU box,
  datasheet otherwise; the notes say which).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtune.modelspec import ModelSpec
from kvtune.pipeline import CostResult
from kvtune.strategies import Stages
from kvtune.strategies.base import budget_tokens

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CostSetup:
    spec: ModelSpec  # the target model's shapes
    context_tokens: int
    memory_budget_bytes: int
    link_gbps: float | None = None  # host-to-device rate for offload
    link_source: str = "none"
    disk_gbps: float | None = None  # sequential read rate of the offload directory (profile), for tier=disk
    host_budget_bytes: int | None = None  # host RAM an offload tier may use (profile), None = unbounded
    device: str = "cpu"
    repeats: int = 7
    warmup: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.spec.dtype]


def backend_label(device: str) -> str:
    from kvtune.kernels.backend import resolve

    return f"{resolve(None).value}-{'cuda' if device.startswith('cuda') else 'cpu'}"


def _random_kv(spec: ModelSpec, tokens: int, dtype: torch.dtype, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (1, spec.kv_heads, tokens, spec.head_dim)  # (B, H, T, D)
    k = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return k, v


def _timer(device: str):
    if device.startswith("cuda"):
        def run(fn) -> float:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop)
    else:
        def run(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


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


def _median_pair(timer, cand_fn, full_fn, setup: "CostSetup") -> tuple[float, float]:
    """Medians of the candidate and the full cache, timed interleaved so drift hits both alike."""
    for _ in range(setup.warmup):
        cand_fn()
        full_fn()
    cand_t, full_t = [], []
    for _ in range(setup.repeats):
        cand_t.append(timer(cand_fn))
        full_t.append(timer(full_fn))
    return statistics.median(cand_t), statistics.median(full_t)


def measure_cost(stages: Stages, setup: CostSetup, seed: int = 0) -> CostResult:
    """Measure one pipeline's cost (see the module docstring)."""
    from kvtune.strategies import build

    spec, ctx, dtype, dev = setup.spec, setup.context_tokens, setup.dtype, setup.device
    sel = stages.selector
    # Bytes: stores encoded in the target KV dtype. Timing: the same stores in the compute dtype, which is the
    # target dtype on a GPU and float32 on a CPU (CPUs emulate fp16 arithmetic; timing it would measure that).
    compute_dtype = dtype if dev.startswith("cuda") else torch.float32
    k, v = _random_kv(spec, ctx, dtype, dev, seed)
    kc, vc = (k, v) if compute_dtype == dtype else (k.to(compute_dtype), v.to(compute_dtype))
    fp16 = build("codec", "fp16", {})
    full_layer_bytes = _filled(fp16, k, v, ctx).nbytes()
    full_timed = _filled(fp16, kc, vc, ctx)
    q = torch.randn((1, spec.q_heads, spec.head_dim), generator=torch.Generator().manual_seed(seed + 1))
    q = q.to(dev, compute_dtype)
    scale = spec.head_dim**-0.5
    probs = sel is not None and sel.decode_time
    timer = _timer(dev)
    total_bytes = 0
    total_ms = 0.0
    full_ms = 0.0
    for kept, layer_codec, count in layer_groups(stages, spec, ctx):
        total_bytes += count * _filled(layer_codec, k, v, kept).nbytes()
        store = _filled(layer_codec, kc, vc, kept)
        cand, full = _median_pair(timer, lambda: store.attend(q, scale, return_probs=probs),  # noqa: B023
                                  lambda: full_timed.attend(q, scale), setup)
        total_ms += count * cand
        full_ms += count * full
    layer_ms = total_ms / spec.layers
    layer_bytes = total_bytes / spec.layers
    full_layer_ms = full_ms / spec.layers

    bytes_per_token = spec.layers * layer_bytes / ctx
    full_bpt = spec.layers * full_layer_bytes / ctx
    gpu_share = stages.placement.gpu_fraction_held()
    per_seq_gpu = bytes_per_token * ctx * gpu_share
    capacity = int(setup.memory_budget_bytes // per_seq_gpu) if per_seq_gpu > 0 else 0
    if gpu_share < 1.0:  # the offloaded share must fit the host tier as well
        host = getattr(stages.placement, "host_bytes", 0) or (
            setup.host_budget_bytes if getattr(stages.placement, "tier", "cpu") == "cpu" else None)
        per_seq_host = bytes_per_token * ctx * (1.0 - gpu_share)
        if host and per_seq_host > 0:
            capacity = min(capacity, int(host // per_seq_host))
    capacity_full = int(setup.memory_budget_bytes // (full_bpt * ctx))
    notes = list(setup.notes)
    if compute_dtype != dtype:
        notes.append(f"timed in float32 on the CPU reference path; bytes in {spec.dtype}")
    transfer_ms = 0.0
    if gpu_share < 1.0:
        if setup.link_gbps:
            link = setup.link_gbps
            if getattr(stages.placement, "tier", "cpu") == "disk" and setup.disk_gbps:
                link = min(link, setup.disk_gbps)
                notes.append(f"disk tier read at {setup.disk_gbps:g} GB/s (profile)")
            offloaded_per_layer = layer_bytes * (1.0 - gpu_share)
            # the copy hides behind attention; budget it with the full cache's attention time, not the
            # candidate's own (a slow reference kernel would otherwise hide more copy than a real one could)
            transfer_ms = spec.layers * stages.placement.exposed_transfer_ms(offloaded_per_layer, link, full_layer_ms)
            notes.append(f"offload copy at {setup.link_gbps:g} GB/s host-to-device ({setup.link_source})")
        else:
            notes.append("no host-to-device rate known: offload transfer time not charged")
    return CostResult(
        bytes_per_token=round(bytes_per_token, 3),
        bytes_per_token_full=round(full_bpt, 3),
        compression_ratio=round(full_bpt / bytes_per_token, 4) if bytes_per_token else math.inf,
        decode_latency_ms=round(layer_ms * spec.layers, 4),
        decode_latency_full_ms=round(full_layer_ms * spec.layers, 4),
        context_tokens=ctx,
        capacity_seqs=capacity,
        capacity_full_seqs=capacity_full,
        memory_budget_bytes=int(setup.memory_budget_bytes),
        transfer_ms=round(transfer_ms, 4),
        backend=backend_label(dev),
        device=device_name(dev),
        notes=notes,
    )


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
