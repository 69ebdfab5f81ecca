"""Hardware probe with NVML and CUDA faked at the library boundary, plus the real host probe of this machine."""

import pytest

from kvtune.profile import bandwidth
from kvtune.profile.hardware import datasheet_for, probe_hardware
from kvtune.profile.nvml import pcie_theoretical_gbps, query_nvml
from profile_fakes import H100_SXM, L4, FakeNvml, FakeTorch

MiB = 1 << 20
GiB = 1 << 30


def test_pcie_theoretical_rates():
    assert pcie_theoretical_gbps(5, 16) == pytest.approx(63.015, abs=1e-3)
    assert pcie_theoretical_gbps(4, 16) == pytest.approx(31.508, abs=1e-3)
    assert pcie_theoretical_gbps(3, 8) == pytest.approx(7.877, abs=1e-3)
    assert pcie_theoretical_gbps(None, 16) is None and pcie_theoretical_gbps(9, 16) is None


def test_nvml_full_answers():
    fake = FakeNvml([H100_SXM, L4])
    r = query_nvml(fake)
    assert r.error is None and r.driver_version == "550.54.15" and r.cuda_driver_version == "12.4"
    g = r.gpus[0]
    assert (g.name, g.compute_capability, g.sm_count, g.power_limit_w) == ("NVIDIA H100 80GB HBM3", "9.0", 132, 700.0)
    assert g.memory_total_bytes == 81559 * MiB and g.memory_free_bytes == (81559 - 600) * MiB
    assert (g.pcie_gen_current, g.pcie_gen_max, g.pcie_width_current, g.pcie_width_max) == (1, 5, 16, 16)
    assert (g.clock_sm_max_mhz, g.clock_mem_max_mhz, g.clock_sm_current_mhz) == (1980, 2619, 345)
    assert g.nvlink_links_active == 18 and g.uuid == "GPU-0000"
    sparse = r.gpus[1]  # a driver that answers "not supported" leaves fields empty instead of failing
    assert sparse.name == "NVIDIA L4" and sparse.sm_count is None and sparse.nvlink_links_active == 0
    assert sparse.power_limit_w is None and sparse.pcie_gen_max == 4
    assert fake.shutdown_called


def test_nvml_missing_library_and_no_gpu():
    r = query_nvml(FakeNvml([], missing_library=True))
    assert r.gpus == [] and r.error == "no NVIDIA driver (NVML library not found)"
    assert query_nvml(FakeNvml([])).error == "NVML found no GPU"


def test_real_nvml_on_this_machine_never_raises():
    r = query_nvml()  # the real pynvml: here NVMLError_LibraryNotFound, on a GPU box a list
    assert r.gpus or r.error


def test_measure_gpu_counts_bytes_and_times_with_events():
    torch = FakeTorch()
    res = bandwidth.measure_gpu(torch, 0, quick=False, link_gbps=63.015, hbm_datasheet_gbps=3350)
    d2d = [s for s in res.samples if s.kind == "d2d"]
    assert len(d2d) == 1 and d2d[0].size_bytes == GiB and d2d[0].counted_bytes == 2 * GiB
    assert d2d[0].median_gbps == pytest.approx(3000.0, rel=1e-6) and d2d[0].timer == "cuda_events"
    assert d2d[0].fraction_of_theoretical == pytest.approx(3000 / 3350, abs=1e-3)
    for kind, rate in (("h2d_pinned", 55.0), ("d2h_pinned", 52.0), ("h2d_pageable", 20.0), ("d2h_pageable", 12.0)):
        pts = [s for s in res.samples if s.kind == kind]
        assert [s.size_bytes for s in pts] == list(bandwidth.HOST_SIZES)
        assert all(s.median_gbps == pytest.approx(rate, rel=1e-6) and s.counted_bytes == s.size_bytes for s in pts)
        assert pts[0].fraction_of_theoretical == pytest.approx(rate / 63.015, abs=1e-3)
    assert res.at_largest("h2d_pinned") == pytest.approx(55.0)
    assert any(pin for _, dev, pin in torch.allocs if dev == "cpu")  # pinned host buffer was asked for


def test_measure_gpu_small_sizes_show_latency_and_spread_is_kept():
    torch = FakeTorch(latency_s=20e-6)  # 20 us per transfer: small copies fall short of the link rate
    res = bandwidth.measure_gpu(torch, 0, quick=True)
    pts = {s.size_bytes: s for s in res.samples if s.kind == "h2d_pinned"}
    assert pts[1 * MiB].median_gbps < 0.6 * pts[256 * MiB].median_gbps
    assert all(s.min_gbps <= s.median_gbps <= s.max_gbps for s in res.samples)


def test_measure_gpu_shrinks_to_free_memory():
    res = bandwidth.measure_gpu(FakeTorch(free=1 * GiB), 0, quick=False)
    d2d = [s for s in res.samples if s.kind == "d2d"][0]
    assert d2d.size_bytes == 256 * MiB and any("too little free GPU memory" in n for n in res.notes)
    assert max(s.size_bytes for s in res.samples if s.kind == "h2d_pinned") == 256 * MiB


def test_probe_with_faked_gpu_fills_nvml_and_measured_fields(tmp_path):
    torch = FakeTorch()
    hp = probe_hardware(quick=True, offload_dir=str(tmp_path), nvml=FakeNvml([H100_SXM]), torch_loader=lambda: torch)
    assert hp.source == "measured" and hp.accelerator == "NVIDIA H100 80GB HBM3"
    assert hp.gpu_memory_total_bytes == 81559 * MiB and hp.compute_capability == "9.0" and hp.sm_count == 132
    assert hp.host_link == "PCIe Gen5 x16" and hp.host_link_theoretical_gbps == pytest.approx(63.015, abs=1e-3)
    assert hp.hbm_bandwidth_gbps == pytest.approx(3000.0) and hp.h2d_pinned_gbps == pytest.approx(55.0)
    assert hp.d2h_pageable_gbps == pytest.approx(12.0) and hp.host_link_gbps() == pytest.approx(55.0)
    assert hp.nvlink_bandwidth_gbps == 900.0 and hp.torch_cuda_version == "12.4"
    assert any("Gen1" in n for n in hp.notes)  # idle link trained down
    assert hp.cpu_ram_total_bytes > 0 and hp.cpu_memory_bandwidth_gbps > 0


def test_probe_gpu_without_cuda_torch_and_without_driver(tmp_path):
    hp = probe_hardware(quick=True, offload_dir=str(tmp_path), nvml=FakeNvml([L4]),
                        torch_loader=lambda: FakeTorch(available=False))
    assert hp.accelerator == "NVIDIA L4" and hp.source == "this-machine" and hp.hbm_bandwidth_gbps is None
    assert any("torch has no CUDA" in n for n in hp.notes)
    hp = probe_hardware(quick=True, offload_dir=str(tmp_path), nvml=FakeNvml([], missing_library=True))
    assert hp.accelerator is None and hp.gpus == [] and hp.notes[0].startswith("no GPU: no NVIDIA driver")


def test_gpu_measurement_failure_keeps_the_rest(tmp_path):
    torch = FakeTorch()
    torch.cuda.mem_get_info = lambda i=0: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory"))
    torch.empty = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory"))
    hp = probe_hardware(quick=True, offload_dir=str(tmp_path), nvml=FakeNvml([H100_SXM]), torch_loader=lambda: torch)
    assert hp.accelerator and hp.hbm_bandwidth_gbps is None
    assert any("measurement failed: RuntimeError" in n for n in hp.notes)


def test_real_host_probe_this_machine(tmp_path):
    hp = probe_hardware(quick=True, offload_dir=str(tmp_path))
    assert hp.cpu_ram_total_bytes >= hp.cpu_ram_available_bytes > 0
    assert hp.cpu_cores_logical >= 1 and hp.cpu_memory_bandwidth_gbps > 0.1
    assert hp.disk_free_bytes > 0 and hp.offload_dir == str(tmp_path)
    if hp.disk_read_gbps is None:
        assert any(n.startswith("disk:") for n in hp.notes)
    kinds = {s.kind for s in hp.bandwidth}
    assert "cpu_copy" in kinds
    assert list(tmp_path.iterdir()) == []  # the disk probe file is removed


def test_datasheet_matching_uses_whole_names():
    assert datasheet_for("NVIDIA L4").name == "l4"
    assert datasheet_for("NVIDIA L40S").name == "l40s"
    assert datasheet_for("NVIDIA H100 PCIe").name == "h100-pcie"
    assert datasheet_for("NVIDIA H100 80GB HBM3").name == "h100-sxm"
    assert datasheet_for("NVIDIA A100-SXM4-80GB").name == "a100-80gb"
    assert datasheet_for("Tesla T4") is None and datasheet_for(None) is None
