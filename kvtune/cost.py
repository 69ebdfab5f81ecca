"""Cost of a pipeline: bytes held, decode-step attention latency, capacity, offload transfer time.

Everything is measured on the candidate's stored form at the *target* model's shapes (layers, KV heads, head
dim, KV dtype) and at the workload's context length:

* **bytes per token** — one layer's store is filled with ``kept`` tokens (the selector's budget of the
  context) and encoded by the codec; its ``nbytes()`` (measured from the stored tensors, scales and residual
  included) times the number of layers, divided by the *context* length. Eviction and compression both show.
* **decode latency** — one decode step's attention for one sequence: the store's ``attend`` (the kernels'
  dispatch: Triton on a GPU, the PyTorch reference on a CPU), median of repeats after warm-up, times the
  number of layers (layers have identical shapes; timing one keeps big targets within memory). The full
  cache is timed in the same run, interleaved, so the ratio is fair on a noisy machine.
* **capacity** — sequences of the context length whose GPU-resident KV fits in the memory budget.
* **transfer** — for offload placements: the host-to-device copy per decode step that prefetch does not hide,
  from the hardware profile's link rate (measured on a GPU box, datasheet otherwise; the notes say which).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from kvtune.modelspec import ModelSpec
from kvtune.pipeline import CostResult
from kvtune.runtime import Stages
from kvtune.strategies.base import budget_tokens

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CostSetup:
    spec: ModelSpec  # the target model's shapes
    context_tokens: int
    memory_budget_bytes: int
    link_gbps: float | None = None  # host-to-device rate for offload
    link_source: str = "none"
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


def _stores(stages: Stages, build, k: torch.Tensor, v: torch.Tensor, kept: int):
    full_store = build("codec", "fp16", {}).new_store()
    full_store.append(k, v)
    store = stages.codec.new_store()
    store.append(k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous())
    return full_store, store


def measure_cost(stages: Stages, setup: CostSetup, seed: int = 0) -> CostResult:
    """Measure one pipeline's cost (see the module docstring)."""
    spec, ctx, dtype, dev = setup.spec, setup.context_tokens, setup.dtype, setup.device
    sel = stages.selector
    kept = budget_tokens(sel.budget, ctx) if sel is not None else ctx
    from kvtune.strategies import build

    # Bytes: stores encoded in the target KV dtype. Timing: the same stores in the compute dtype, which is the
    # target dtype on a GPU and float32 on a CPU (CPUs emulate fp16 arithmetic; timing it would measure that).
    compute_dtype = dtype if dev.startswith("cuda") else torch.float32
    k, v = _random_kv(spec, ctx, dtype, dev, seed)
    full_store, store = _stores(stages, build, k, v, kept)
    layer_bytes = store.nbytes()
    full_layer_bytes = full_store.nbytes()
    if compute_dtype != dtype:
        full_store, store = _stores(stages, build, k.to(compute_dtype), v.to(compute_dtype), kept)

    q = torch.randn((1, spec.q_heads, spec.head_dim), generator=torch.Generator().manual_seed(seed + 1))
    q = q.to(dev, compute_dtype)
    scale = spec.head_dim**-0.5
    probs = sel is not None and sel.decode_time
    timer = _timer(dev)
    cand_fn = lambda: store.attend(q, scale, return_probs=probs)  # noqa: E731
    full_fn = lambda: full_store.attend(q, scale)  # noqa: E731
    for _ in range(setup.warmup):
        cand_fn()
        full_fn()
    cand_t, full_t = [], []
    for _ in range(setup.repeats):
        cand_t.append(timer(cand_fn))
        full_t.append(timer(full_fn))
    layer_ms = statistics.median(cand_t)
    full_layer_ms = statistics.median(full_t)

    bytes_per_token = spec.layers * layer_bytes / ctx
    full_bpt = spec.layers * full_layer_bytes / ctx
    gpu_share = stages.placement.gpu_fraction_held()
    per_seq_gpu = bytes_per_token * ctx * gpu_share
    capacity = int(setup.memory_budget_bytes // per_seq_gpu) if per_seq_gpu > 0 else 0
    capacity_full = int(setup.memory_budget_bytes // (full_bpt * ctx))
    notes = list(setup.notes)
    if compute_dtype != dtype:
        notes.append(f"timed in float32 on the CPU reference path; bytes in {spec.dtype}")
    transfer_ms = 0.0
    if gpu_share < 1.0:
        if setup.link_gbps:
            offloaded_per_layer = layer_bytes * (1.0 - gpu_share)
            transfer_ms = spec.layers * stages.placement.exposed_transfer_ms(offloaded_per_layer, setup.link_gbps, layer_ms)
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
