"""kvtune.measure.timing: the device-aware timers (CPU paths here; the CUDA paths run on a GPU host)."""

import time

import pytest
import torch

from kvtune.measure import timing


def _sleeper(ms, calls, name):
    def fn():
        calls.append(name)
        time.sleep(ms / 1e3)
    return fn


def test_time_ms_cpu_is_the_median_of_the_repeats_after_warmup():
    calls = []
    t = timing.time_ms(_sleeper(4, calls, "f"), "cpu", repeats=5, warmup=2)
    assert len(calls) == 7  # 2 warm-up + 5 timed
    assert 4.0 <= t < 60.0  # sleep never returns early; a loaded 2-core VM may add tens of ms at worst


def test_time_pair_ms_interleaves_and_keeps_the_two_apart():
    calls = []
    cand, full = timing.time_pair_ms(_sleeper(2, calls, "c"), _sleeper(12, calls, "f"), "cpu", repeats=3, warmup=1)
    assert calls == ["c", "f"] * 4
    assert 2.0 <= cand < full and full >= 12.0


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_counts_are_validated(bad):
    with pytest.raises(ValueError, match="time_ms: repeats must be a positive int"):
        timing.time_ms(lambda: None, "cpu", repeats=bad)


def test_pinned_copy_needs_a_gpu():
    with pytest.raises(ValueError, match="pinned_copy_ms: device cpu is not a CUDA device"):
        timing.pinned_copy_ms(1 << 20, "cpu")
    with pytest.raises(ValueError, match="nbytes must be a positive int"):
        timing.pinned_copy_ms(0, "cuda")


def test_label_names_the_clock_and_the_machine():
    assert timing.timer_label("cpu").startswith("perf_counter, median (cpu ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timers_agree_with_a_synchronized_host_clock():
    """A 256 MiB device copy timed with events (L2 flushed) and with perf_counter around synchronize: the
    host clock includes launch and sync overhead, so it may only be slower, and by little at this size."""
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    fn = lambda: y.copy_(x)  # noqa: E731
    ev = timing.time_ms(fn, "cuda")
    cand, full = timing.time_pair_ms(fn, fn, "cuda", repeats=10, warmup=2)
    torch.cuda.synchronize()
    host = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        host.append((time.perf_counter() - t0) * 1e3)
    host_ms = sorted(host)[5]
    for t in (ev, cand, full):
        assert 0.5 * host_ms <= t <= 1.05 * host_ms + 0.05
    copy_ms = timing.pinned_copy_ms(64 << 20, "cuda")
    assert 64 * 2**20 / (copy_ms / 1e3) / 1e9 > 5.0  # any PCIe 4/5 or NVLink-C2C link moves > 5 GB/s pinned
