"""Measured copy rates: GPU memory (device to device), host<->device (pinned and pageable), host memory, disk.

Every figure is the median of repeated timed copies after warm-up, with the minimum and maximum kept as its
spread. Rates are in GB/s (10^9 bytes/s). GPU copies are timed with CUDA events on the copying stream; host
copies and disk reads with ``time.perf_counter``.

Byte counting: a device-to-device or host memory copy reads every byte once and writes it once, so its rate
counts ``2 * size`` bytes (the convention of STREAM's "copy" and of HBM roofline figures); a host<->device
transfer counts ``size`` bytes (each byte crosses the link once).

The ``torch`` argument of the GPU functions is the library boundary: tests pass a fake module exposing the
few calls used here (``empty``, ``uint8``, ``Tensor.copy_``, ``cuda.Event``, ``cuda.synchronize``,
``cuda.device``, ``cuda.mem_get_info``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvtune.profile.schema import BandwidthSample

MiB = 1 << 20
GiB = 1 << 30
HOST_SIZES = (1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
HOST_SIZES_QUICK = (1 * MiB, 16 * MiB, 256 * MiB)
D2D_SIZE = 1 * GiB
D2D_SIZE_QUICK = 256 * MiB


def _repeats(size: int, quick: bool) -> int:
    if size <= 16 * MiB:
        return 10 if quick else 30
    if size <= 256 * MiB:
        return 5 if quick else 10
    return 3 if quick else 5


def summarize(kind: str, size: int, counted: int, seconds: list[float], timer: str,
              theoretical_gbps: float | None = None) -> BandwidthSample:
    """Rates of ``counted`` bytes moved in each of ``seconds``: median, min, max (GB/s)."""
    rates = [counted / s / 1e9 for s in seconds if s > 0]
    if not rates:
        raise ValueError(f"{kind}: no positive timing")
    med = statistics.median(rates)
    return BandwidthSample(
        kind=kind, size_bytes=size, counted_bytes=counted, repeats=len(rates),
        median_gbps=round(med, 3), min_gbps=round(min(rates), 3), max_gbps=round(max(rates), 3), timer=timer,
        fraction_of_theoretical=round(med / theoretical_gbps, 3) if theoretical_gbps else None,
    )


# ----------------------------------------------------------------------------------------------- GPU


def _time_cuda(torch: Any, copy: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``copy`` from CUDA events recorded around it on the current stream."""
    for _ in range(warmup):
        copy()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        copy()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in milliseconds
    return out


@dataclass
class GpuBandwidth:
    samples: list[BandwidthSample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def at_largest(self, kind: str) -> float | None:
        """Median rate of ``kind`` at the largest size measured (the asymptotic rate)."""
        found = [s for s in self.samples if s.kind == kind]
        return max(found, key=lambda s: s.size_bytes).median_gbps if found else None


def measure_gpu(torch: Any, device_index: int = 0, *, quick: bool = False, link_gbps: float | None = None,
                hbm_datasheet_gbps: float | None = None, progress: Callable[[str], None] | None = None) -> GpuBandwidth:
    """D2D at >=1 GiB (256 MiB with ``quick``), then H2D/D2H pinned and pageable at :data:`HOST_SIZES`."""
    result = GpuBandwidth()
    say = progress or (lambda msg: None)
    dev = f"cuda:{device_index}"
    with torch.cuda.device(device_index):
        try:
            free, _total = torch.cuda.mem_get_info(device_index)
        except Exception:  # noqa: BLE001 - older torch / odd drivers: assume the size fits
            free = None
        size = D2D_SIZE_QUICK if quick else D2D_SIZE
        while free is not None and 2 * size > 0.8 * free and size > 64 * MiB:
            size //= 2
        if size < (D2D_SIZE_QUICK if quick else D2D_SIZE):
            result.notes.append(f"device-to-device copy measured at {size // MiB} MiB: too little free GPU memory "
                                "for the full size")
        say(f"GPU {device_index}: device-to-device copy, {size // MiB} MiB")
        src = torch.empty(size, dtype=torch.uint8, device=dev)
        dst = torch.empty(size, dtype=torch.uint8, device=dev)
        secs = _time_cuda(torch, lambda: dst.copy_(src), _repeats(size, quick))
        result.samples.append(summarize("d2d", size, 2 * size, secs, "cuda_events", hbm_datasheet_gbps))
        del src, dst

        sizes = HOST_SIZES_QUICK if quick else HOST_SIZES
        top = max(sizes)
        if free is not None and top > 0.8 * free:
            sizes = tuple(s for s in sizes if s <= 0.8 * free)
            result.notes.append("host transfers above 80% of free GPU memory were skipped")
        if not sizes:
            return result
        big = max(sizes)
        device_buf = torch.empty(big, dtype=torch.uint8, device=dev)
        for pinned in (True, False):
            label = "pinned" if pinned else "pageable"
            say(f"GPU {device_index}: host<->device, {label} memory, {len(sizes)} sizes")
            host_buf = torch.empty(big, dtype=torch.uint8, pin_memory=pinned)
            for s in sizes:
                h, d = host_buf[:s], device_buf[:s]
                secs = _time_cuda(torch, lambda: d.copy_(h, non_blocking=pinned), _repeats(s, quick))
                result.samples.append(summarize(f"h2d_{label}", s, s, secs, "cuda_events", link_gbps))
                secs = _time_cuda(torch, lambda: h.copy_(d, non_blocking=pinned), _repeats(s, quick))
                result.samples.append(summarize(f"d2h_{label}", s, s, secs, "cuda_events", link_gbps))
            del host_buf
        del device_buf
    return result


# ----------------------------------------------------------------------------------------------- host


def measure_cpu_memory(*, quick: bool = False) -> BandwidthSample:
    """One-thread host memory copy (numpy ``copyto``), 2 x size bytes counted: what one copy thread achieves."""
    import numpy as np

    size = (64 if quick else 256) * MiB
    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    np.copyto(dst, src)  # warm-up: faults every page in
    secs = []
    for _ in range(3 if quick else 5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        secs.append(time.perf_counter() - t0)
    return summarize("cpu_copy", size, 2 * size, secs, "perf_counter")


def measure_matmul_gflops(torch: Any, n: int = 1024, repeats: int = 5) -> float:
    """Float32 square matmul rate with torch's threads (GFLOP/s, 2 n^3 per product), median after a warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def filesystem_type(path: str) -> str | None:
    """The mount type (ext4, xfs, tmpfs, overlay, ...) of the filesystem holding ``path``."""
    try:
        import psutil

        real = os.path.realpath(path)
        best = None
        for part in psutil.disk_partitions(all=True):
            mp = part.mountpoint
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) > len(best[0])):
                best = (mp, part.fstype)
        return best[1] if best else None
    except Exception:  # noqa: BLE001 - informational only
        return None


@dataclass
class DiskResult:
    free_bytes: int | None
    sample: BandwidthSample | None
    cache_dropped: bool | None
    fs_type: str | None
    notes: list[str] = field(default_factory=list)


def measure_disk(folder: str, *, quick: bool = False) -> DiskResult:
    """Sequential read rate of a fresh file in ``folder``, with its pages dropped from the page cache first.

    The file is written, fsync'ed, and before each timed read ``posix_fadvise(DONTNEED)`` evicts its (clean)
    pages, so the read comes from the device. Where that call does not exist the read is likely served from
    memory and ``cache_dropped`` is False. The file is removed afterwards.
    """
    target = Path(folder)
    fs = filesystem_type(str(target))
    try:
        free = shutil.disk_usage(target).free
    except OSError as exc:
        return DiskResult(None, None, None, fs, [f"disk: cannot stat {target} ({exc.strerror})"])
    size = (64 if quick else 256) * MiB
    if free < 4 * size:
        return DiskResult(free, None, None, fs, [f"disk: read test skipped, less than {4 * size // MiB} MiB free"])
    chunk = 8 * MiB
    block = os.urandom(MiB) * (chunk // MiB)  # incompressible enough: compression would inflate the rate
    path = target / f".kvtune-disk-probe-{os.getpid()}.bin"
    notes: list[str] = []
    can_drop = hasattr(os, "posix_fadvise")
    try:
        with open(path, "wb") as fh:
            for _ in range(size // chunk):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        buf = bytearray(chunk)
        secs = []
        for _ in range(2 if quick else 3):
            with open(path, "rb", buffering=0) as fh:
                if can_drop:
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                while fh.readinto(buf):
                    pass
                secs.append(time.perf_counter() - t0)
    except OSError as exc:
        return DiskResult(free, None, None, fs, [f"disk: read test failed in {target} ({exc.strerror or exc})"])
    finally:
        path.unlink(missing_ok=True)
    if fs in ("tmpfs", "ramfs"):
        notes.append(f"disk: {target} is on {fs} (memory), so its read rate is a memory rate")
    if not can_drop:
        notes.append("disk: page cache could not be dropped on this OS; the read rate may be a cache rate")
    return DiskResult(free, summarize("disk_read", size, size, secs, "perf_counter"), can_drop and fs not in (
        "tmpfs", "ramfs"), fs, notes)
