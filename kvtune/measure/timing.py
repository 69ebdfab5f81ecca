"""Device-aware timers: the one place that knows how to time work on a CPU and on a CUDA GPU.

* **CUDA** — device work is asynchronous, so host clocks lie: a timed region is bracketed by CUDA events on the
  current stream and read after a synchronize. Before each timed run the L2 cache is flushed (a buffer twice
  the L2 size is zeroed, outside the events), so a small cache read from L2 on the previous run is not timed as
  if it came from HBM. Warm-up runs come first (they also compile Triton kernels); the figure is the median.
  :func:`time_ms` uses ``triton.testing.do_bench`` (events, its own cache flush, median) when Triton imports.
* **CPU** — ``time.perf_counter`` around each run, median of the repeats after warm-up.

:func:`pinned_copy_ms` times a real host-to-device copy from page-locked memory, the transfer an offloaded
cache makes; it needs a CUDA device (a CPU has no such link: callers must not present a host memcpy as one).
:func:`prefetch_overlap_ms` times what an offloaded decode step really pays: per-layer host blocks brought in by
:class:`~kvtune.kernels.offload.LayerPrefetcher` on its side stream while attention runs on the previous layer.
:func:`timer_label` says which of these produced a figure, for the provenance every figure carries.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from kvtune.kernels.offload import LayerPrefetcher

__all__ = ["time_ms", "time_pair_ms", "pinned_copy_ms", "prefetch_overlap_ms", "timer_label", "is_cuda"]


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def _check_counts(repeats: int, warmup: int, where: str) -> None:
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"{where}: repeats must be a positive int, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"{where}: warmup must be a non-negative int, got {warmup!r}")


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer twice the size of the device's L2 cache; zeroing it evicts whatever a timed run left there."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    return torch.empty(2 * l2, dtype=torch.uint8, device=device)


def _cuda_run_ms(fn: Callable[[], object], flush: torch.Tensor) -> tuple:
    """Enqueue one flushed, event-bracketed run; returns the (start, stop) events (read after a sync)."""
    flush.zero_()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    return start, stop


def time_ms(fn: Callable[[], object], device: torch.device | str, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of one call of ``fn`` on ``device``.

    CUDA: ``triton.testing.do_bench(fn, return_mode="median")`` when Triton imports (it picks its own counts:
    about 25 ms of warm-up and 100 ms of timed runs, L2 flushed before each); otherwise ``warmup`` calls, then
    ``repeats`` event-timed calls with the L2 flushed before each. CPU: ``warmup`` calls, then the median of
    ``repeats`` ``perf_counter`` timings.
    """
    _check_counts(repeats, warmup, "time_ms")
    dev = torch.device(device)
    if dev.type != "cuda":
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    with torch.cuda.device(dev):
        try:
            import triton.testing
        except Exception:  # no Triton: the same measurement by hand
            pass
        else:
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        for _ in range(warmup):
            fn()
        flush = _flush_buffer(dev)
        events = [_cuda_run_ms(fn, flush) for _ in range(repeats)]
        torch.cuda.synchronize(dev)
        return statistics.median(a.elapsed_time(b) for a, b in events)


def time_pair_ms(cand_fn: Callable[[], object], full_fn: Callable[[], object], device: torch.device | str,
                 repeats: int = 7, warmup: int = 1) -> tuple[float, float]:
    """Medians (candidate ms, full ms) of two calls timed interleaved (cand, full, cand, full, ...), so drift in
    clocks or load hits both alike. ``warmup`` rounds of both first. CUDA: event-timed, L2 flushed before each
    call; CPU: ``perf_counter``."""
    _check_counts(repeats, warmup, "time_pair_ms")
    dev = torch.device(device)
    for _ in range(warmup):
        cand_fn()
        full_fn()
    if dev.type != "cuda":
        cand_t, full_t = [], []
        for _ in range(repeats):
            for fn, out in ((cand_fn, cand_t), (full_fn, full_t)):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(cand_t), statistics.median(full_t)
    with torch.cuda.device(dev):
        flush = _flush_buffer(dev)
        pairs = [(_cuda_run_ms(cand_fn, flush), _cuda_run_ms(full_fn, flush)) for _ in range(repeats)]
        torch.cuda.synchronize(dev)
    return (statistics.median(c[0].elapsed_time(c[1]) for c, _f in pairs),
            statistics.median(f[0].elapsed_time(f[1]) for _c, f in pairs))


def pinned_copy_ms(nbytes: int, device: torch.device | str, *, repeats: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of one host-to-device copy of ``nbytes`` from page-locked (pinned) host memory into
    ``device`` memory, issued ``non_blocking`` as the offload prefetcher issues it and timed with CUDA events.

    ValueError for a non-CUDA device: without a GPU there is no host-to-device link to measure.
    """
    _check_counts(repeats, warmup, "pinned_copy_ms")
    if not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"pinned_copy_ms: nbytes must be a positive int, got {nbytes!r}")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"pinned_copy_ms: device {dev} is not a CUDA device; a host-to-device copy needs a GPU")
    with torch.cuda.device(dev):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        src.random_(0, 256)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        for _ in range(warmup):
            dst.copy_(src, non_blocking=True)
        events = []
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            stop.record()
            events.append((start, stop))
        torch.cuda.synchronize(dev)
    return statistics.median(a.elapsed_time(b) for a, b in events)


def prefetch_overlap_ms(host_layers: list, attend: Callable[[list], object], device: torch.device | str, *,
                        repeats: int = 5, warmup: int = 1, depth: int = 2) -> dict:
    """Time one offloaded decode step over ``len(host_layers)`` layers three ways, each the median of ``repeats``:

    * ``transfer_ms`` — every layer's host blocks copied in through a :class:`LayerPrefetcher`, nothing else;
    * ``compute_ms`` — ``attend(device tensors of a layer)`` once per layer, the blocks already on the device;
    * ``overlapped_ms`` — the real schedule: layer ``l + 1`` prefetched on the side stream while ``attend`` runs
      on layer ``l``.

    Also ``exposed_ms = max(0, overlapped - compute)`` (the copy time prefetch did not hide) and, on a GPU,
    ``hidden_fraction = (transfer + compute - overlapped) / transfer`` in [0, 1]. ``host_layers[l]`` is the list
    of contiguous host tensors of layer ``l`` (pinned for an asynchronous copy: ``kernels.offload.pinned_empty``).
    On a CPU the prefetcher copies synchronously and nothing overlaps: ``hidden_fraction`` is None there.
    """
    _check_counts(repeats, warmup, "prefetch_overlap_ms")
    dev = torch.device(device)
    n = len(host_layers)
    resident = [t.to(dev) for t in host_layers[0]]

    def transfer_only():
        pf = LayerPrefetcher(host_layers, dev, depth=depth)
        for i in range(n):
            pf.get(i)
            pf.release(i)

    def compute_only():
        for _ in range(n):
            attend(resident)

    def overlapped():
        pf = LayerPrefetcher(host_layers, dev, depth=depth)
        pf.prefetch(0)
        for i in range(n):
            blocks = pf.get(i)
            if i + 1 < n:
                pf.prefetch(i + 1)
            attend(blocks)
            pf.release(i)

    if dev.type == "cuda":  # whole-schedule times: events around each schedule, no L2 flush between layers
        def run(fn):
            for _ in range(warmup):
                fn()
            events = []
            for _ in range(repeats):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                events.append((start, stop))
            torch.cuda.synchronize(dev)
            return statistics.median(a.elapsed_time(b) for a, b in events)

        with torch.cuda.device(dev):
            tx, tc, tov = run(transfer_only), run(compute_only), run(overlapped)
    else:
        tx, tc, tov = (time_ms(f, dev, repeats=repeats, warmup=warmup) for f in (transfer_only, compute_only, overlapped))
    hidden = max(0.0, min(1.0, (tx + tc - tov) / tx)) if dev.type == "cuda" and tx > 0 else None
    return dict(transfer_ms=tx, compute_ms=tc, overlapped_ms=tov, exposed_ms=max(0.0, tov - tc),
                hidden_fraction=hidden, layers=n,
                layer_bytes=sum(t.numel() * t.element_size() for t in host_layers[0]))


def timer_label(device: torch.device | str) -> str:
    """How :func:`time_ms` / :func:`time_pair_ms` time on ``device``, with the device's name."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"CUDA events, L2 flushed, median ({torch.cuda.get_device_name(dev)})"
    import platform

    return f"perf_counter, median (cpu {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
