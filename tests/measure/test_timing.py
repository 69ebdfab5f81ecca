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
    from kvtune.kernels.offload import pinned_empty

    layers = [[pinned_empty((32 << 20,), torch.uint8).random_(0, 256)] for _ in range(4)]
    r = timing.prefetch_overlap_ms(layers, lambda kv: torch.cuda._sleep(1_000_000), "cuda")
    assert 0.0 <= r["hidden_fraction"] <= 1.0
    assert r["overlapped_ms"] <= r["transfer_ms"] + r["compute_ms"] + 0.5  # overlap never costs more than serial


def test_prefetch_overlap_on_cpu_runs_the_real_schedule():
    """Every layer reaches ``attend`` with its own data, in order; on a CPU nothing overlaps (no figure)."""
    layers = [[torch.full((4, 1024), float(i)), torch.full((4, 1024), -float(i))] for i in range(3)]
    seen = []
    r = timing.prefetch_overlap_ms(layers, lambda kv: seen.append((float(kv[0][0, 0]), float(kv[1][0, 0]))), "cpu",
                                   repeats=2, warmup=1)
    per_schedule = [(float(i), -float(i)) for i in range(3)]
    compute = [(0.0, -0.0)] * 3  # compute_only reuses layer 0's resident blocks
    assert seen == compute * 3 + per_schedule * 3  # (warm-up + 2 repeats) of compute_only, then of overlapped
    assert r["layers"] == 3 and r["layer_bytes"] == 2 * 4 * 1024 * 4
    assert r["hidden_fraction"] is None
    assert r["exposed_ms"] == max(0.0, r["overlapped_ms"] - r["compute_ms"])
    for key in ("transfer_ms", "compute_ms", "overlapped_ms"):
        assert r[key] >= 0.0
