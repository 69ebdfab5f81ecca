"""This machine (or a reference GPU from its datasheet) as a :class:`HardwareProfile`.

:func:`probe_hardware` lists GPUs through NVML, measures GPU 0's copy rates with CUDA events when torch sees
CUDA, and always measures the host: CPU, RAM, NUMA nodes, one-thread memory copy rate, free disk and sequential
read rate of the offload folder. It never raises for a missing GPU or driver; it says so in ``notes``.
:func:`reference_hardware` reads the datasheet profiles shipped in ``kvtune.profiles/hardware``.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from kvtune.errors import UserError
from kvtune.profile import bandwidth
from kvtune.profile.nvml import pcie_theoretical_gbps, query_nvml
from kvtune.profile.schema import HardwareProfile

_HOST_FIELDS = ("cpu_model", "cpu_cores_physical", "cpu_cores_logical", "numa_nodes", "cpu_ram_total_bytes",
                "cpu_ram_available_bytes")


# ----------------------------------------------------------------------------------------------- host


def cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def numa_node_count() -> int | None:
    """NUMA nodes from sysfs (Linux); psutil has no NUMA query. ``None`` where sysfs has no node list."""
    folder = Path("/sys/devices/system/node")
    try:
        nodes = [p for p in folder.iterdir() if re.fullmatch(r"node\d+", p.name)]
    except OSError:
        return None
    return len(nodes) or None


def host_fields() -> dict[str, Any]:
    import psutil

    vm = psutil.virtual_memory()
    return {
        "cpu_model": cpu_model_name(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "numa_nodes": numa_node_count(),
        "cpu_ram_total_bytes": int(vm.total),
        "cpu_ram_available_bytes": int(vm.available),
    }


# ----------------------------------------------------------------------------------------------- reference


def _reference_folder():
    return resources.files("kvtune.profiles").joinpath("hardware")


def list_reference_hardware() -> list[str]:
    """Names of the datasheet profiles shipped with kvtune (``h100-sxm``, ``l4``, ...)."""
    return sorted(p.name.removesuffix(".yaml") for p in _reference_folder().iterdir() if p.name.endswith(".yaml"))


def _load_reference_file(name: str) -> HardwareProfile:
    ref = _reference_folder().joinpath(f"{name}.yaml")
    try:
        data = yaml.safe_load(ref.read_text(encoding="utf-8"))
        return HardwareProfile.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:  # a packaging bug, still reported in one line
        raise UserError(f"kvtune.profiles/hardware/{name}.yaml: invalid reference profile ({exc})".splitlines()[0]) \
            from None


def reference_hardware(name: str, *, fill_host: bool = True) -> HardwareProfile:
    """A datasheet profile by name. Host fields a GPU datasheet lacks (0 in the file) are taken from this
    machine when ``fill_host`` (the GPU is hypothetical, the host is the one kvtune runs on)."""
    key = name.strip().lower()
    known = list_reference_hardware()
    if key not in known:
        raise UserError(f"unknown hardware '{name}' (known: {', '.join(known)})")
    prof = _load_reference_file(key)
    if fill_host and prof.cpu_ram_total_bytes == 0:
        host = host_fields()
        prof = prof.model_copy(update={k: v for k, v in host.items() if getattr(prof, k) in (None, 0)})
        prof.notes = [n for n in prof.notes if not n.startswith("host fields")] + [
            "host fields (CPU, RAM) are this machine's: a GPU datasheet does not give them"]
    return prof


def datasheet_for(gpu_name: str | None) -> HardwareProfile | None:
    """The reference profile whose ``matches`` pattern names this NVML GPU (whole words), if any."""
    if not gpu_name:
        return None
    low = gpu_name.lower()
    for name in list_reference_hardware():
        prof = _load_reference_file(name)
        if any(re.search(r"(?<![\w-])" + re.escape(p) + r"(?![\w-])", low) for p in prof.matches):
            return prof
    return None


# ----------------------------------------------------------------------------------------------- probe


def _import_torch() -> Any | None:
    try:
        import torch
    except ImportError:
        return None
    return torch


def probe_hardware(*, quick: bool = False, offload_dir: str | None = None, nvml: Any = None,
                   torch_loader: Callable[[], Any] | None = None,
                   progress: Callable[[str], None] | None = None) -> HardwareProfile:
    """Profile this machine. ``nvml`` / ``torch_loader`` replace the NVML module / torch import (tests)."""
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    notes: list[str] = []
    sources: dict[str, str] = {}
    fields: dict[str, Any] = dict(host_fields())

    say("GPUs: querying NVML")
    inv = query_nvml(nvml)
    fields["gpus"] = inv.gpus
    fields["driver_version"] = inv.driver_version
    fields["cuda_driver_version"] = inv.cuda_driver_version
    samples = []
    if not inv.gpus:
        notes.append(f"no GPU: {inv.error or 'none found'}; profiled CPU, RAM and disk only")
    else:
        g0 = inv.gpus[0]
        fields.update(accelerator=g0.name, gpu_memory_total_bytes=g0.memory_total_bytes,
                      gpu_memory_free_bytes=g0.memory_free_bytes, compute_capability=g0.compute_capability,
                      sm_count=g0.sm_count, power_limit_w=g0.power_limit_w)
        sources["gpus"] = "NVML (nvidia-ml-py)"
        gen, width = g0.pcie_gen_max, g0.pcie_width_max
        link = pcie_theoretical_gbps(gen, width)
        ref = datasheet_for(g0.name)
        if ref is not None and ref.host_link == "NVLink-C2C":
            fields["host_link"], link = "NVLink-C2C", ref.host_link_theoretical_gbps
            sources["host_link_theoretical_gbps"] = ref.sources.get("host_link_theoretical_gbps", "datasheet")
        elif link is not None:
            fields["host_link"] = f"PCIe Gen{gen} x{width}"
            sources["host_link_theoretical_gbps"] = "NVML max link generation and width x PCIe per-lane payload rate"
        fields["host_link_theoretical_gbps"] = link
        if g0.pcie_gen_current is not None and gen is not None and g0.pcie_gen_current < gen:
            notes.append(f"PCIe link at Gen{g0.pcie_gen_current} when queried (idle GPUs train down; "
                         f"max Gen{gen})")
        if ref is not None:
            fields["nvlink_bandwidth_gbps"] = ref.nvlink_bandwidth_gbps
        torch = (torch_loader or _import_torch)()
        if torch is None:
            notes.append("torch is not installed: GPU bandwidths not measured")
        elif not torch.cuda.is_available():
            notes.append("NVML sees GPUs but torch has no CUDA (CPU-only build?): GPU bandwidths not measured")
        else:
            fields["torch_cuda_version"] = getattr(torch.version, "cuda", None)
            try:
                gbw = bandwidth.measure_gpu(torch, 0, quick=quick, link_gbps=link,
                                            hbm_datasheet_gbps=ref.hbm_bandwidth_gbps if ref else None,
                                            progress=say)
            except Exception as exc:  # noqa: BLE001 - a failed measurement must not lose the rest of the profile
                notes.append(f"GPU bandwidth measurement failed: {type(exc).__name__}: {exc}".splitlines()[0])
            else:
                samples += gbw.samples
                notes += gbw.notes
                fields.update(hbm_bandwidth_gbps=gbw.at_largest("d2d"), h2d_pinned_gbps=gbw.at_largest("h2d_pinned"),
                              d2h_pinned_gbps=gbw.at_largest("d2h_pinned"),
                              h2d_pageable_gbps=gbw.at_largest("h2d_pageable"),
                              d2h_pageable_gbps=gbw.at_largest("d2h_pageable"))
                for k in ("hbm_bandwidth_gbps", "h2d_pinned_gbps", "d2h_pinned_gbps", "h2d_pageable_gbps",
                          "d2h_pageable_gbps"):
                    sources[k] = "measured: CUDA events, median at the largest size (see bandwidth)"
                if len(inv.gpus) > 1:
                    notes.append(f"{len(inv.gpus)} GPUs: bandwidths measured on GPU 0 only")

    say("host: memory copy")
    cpu = bandwidth.measure_cpu_memory(quick=quick)
    samples.append(cpu)
    fields["cpu_memory_bandwidth_gbps"] = cpu.median_gbps
    sources["cpu_memory_bandwidth_gbps"] = "measured: one-thread numpy copy, perf_counter, 2 x size bytes counted"
    torch_mod = _import_torch()
    if torch_mod is not None:
        say("host: float32 matmul rate")
        fields["cpu_matmul_gflops"] = round(bandwidth.measure_matmul_gflops(torch_mod, 512 if quick else 1024), 2)
        sources["cpu_matmul_gflops"] = (f"measured: float32 square matmul with torch's {torch_mod.get_num_threads()} "
                                        "threads, median of 5")

    folder = offload_dir or tempfile.gettempdir()
    say(f"disk: sequential read in {folder}")
    disk = bandwidth.measure_disk(folder, quick=quick)
    fields.update(offload_dir=os.path.abspath(folder), offload_fs_type=disk.fs_type, disk_free_bytes=disk.free_bytes,
                  disk_read_cache_dropped=disk.cache_dropped,
                  disk_read_gbps=disk.sample.median_gbps if disk.sample else None)
    if disk.sample:
        samples.append(disk.sample)
        sources["disk_read_gbps"] = "measured: sequential 8 MiB reads of a fresh file after posix_fadvise(DONTNEED)"
    notes += disk.notes

    has_rates = any(s.kind in ("d2d", "h2d_pinned") for s in samples)
    return HardwareProfile(
        name=platform.node() or "this-machine",
        source="measured" if has_rates else "this-machine",
        bandwidth=samples,
        sources=sources,
        notes=notes,
        probe_seconds=round(time.perf_counter() - t0, 3),
        **fields,
    )
