"""GPU inventory through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

:func:`query_nvml` never raises: a machine without the NVIDIA driver (``NVMLError_LibraryNotFound``), without
GPUs, or with a driver that lacks one query still yields a result, with the reason in ``error`` or the field
left ``None``. The ``nvml`` argument is the library boundary the tests replace with a fake module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtune.profile.schema import GpuInfo

# Per-lane, per-direction payload rate of a PCIe link in GB/s, after line encoding:
# Gen1/2: 2.5/5 GT/s with 8b/10b; Gen3/4/5: 8/16/32 GT/s with 128b/130b; Gen6: 64 GT/s PAM4 with 242B/256B FLITs.
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 8 * 128 / 130 / 8, 4: 16 * 128 / 130 / 8, 5: 32 * 128 / 130 / 8,
                  6: 64 * 242 / 256 / 8}


def pcie_theoretical_gbps(gen: int | None, width: int | None) -> float | None:
    """One direction's payload rate of a PCIe link (before packet/protocol overhead), GB/s."""
    if not gen or not width or gen not in PCIE_LANE_GBPS:
        return None
    return round(PCIE_LANE_GBPS[gen] * width, 3)


@dataclass
class NvmlResult:
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    error: str | None = None  # why there is no GPU list, in words


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def query_nvml(nvml: Any = None) -> NvmlResult:
    """Every GPU NVML sees, with the fields of :class:`GpuInfo`; the reason in ``error`` when none."""
    if nvml is None:
        try:
            import pynvml as nvml  # the nvidia-ml-py distribution
        except ImportError:
            return NvmlResult(error="nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    nvml_error = getattr(nvml, "NVMLError", Exception)
    try:
        nvml.nvmlInit()
    except nvml_error as exc:
        not_found = getattr(nvml, "NVMLError_LibraryNotFound", None)
        if not_found is not None and isinstance(exc, not_found):
            return NvmlResult(error="no NVIDIA driver (NVML library not found)")
        return NvmlResult(error=f"NVML could not start ({exc})")
    except OSError as exc:  # a broken driver install can surface as a plain OSError
        return NvmlResult(error=f"NVML could not start ({exc})")

    def get(fn_name: str, *args: Any) -> Any:
        fn = getattr(nvml, fn_name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except nvml_error:
            return None

    try:
        result = NvmlResult()
        drv = get("nvmlSystemGetDriverVersion")
        result.driver_version = _text(drv) if drv is not None else None
        cuda = get("nvmlSystemGetCudaDriverVersion_v2") or get("nvmlSystemGetCudaDriverVersion")
        if cuda:
            result.cuda_driver_version = f"{int(cuda) // 1000}.{int(cuda) % 1000 // 10}"
        count = get("nvmlDeviceGetCount") or 0
        if count == 0:
            result.error = "NVML found no GPU"
        for i in range(int(count)):
            handle = get("nvmlDeviceGetHandleByIndex", i)
            if handle is None:
                continue
            result.gpus.append(_gpu(i, handle, nvml, get))
        return result
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml_error:
            pass


def _gpu(index: int, handle: Any, nvml: Any, get) -> GpuInfo:
    name = get("nvmlDeviceGetName", handle)
    mem = get("nvmlDeviceGetMemoryInfo", handle)
    cc = get("nvmlDeviceGetCudaComputeCapability", handle)
    attrs = get("nvmlDeviceGetAttributes_v2", handle) or get("nvmlDeviceGetAttributes", handle)
    sm_count = getattr(attrs, "multiprocessorCount", None) if attrs is not None else None
    pci = get("nvmlDeviceGetPciInfo", handle)
    bus = getattr(pci, "busId", None) if pci is not None else None
    power_mw = get("nvmlDeviceGetEnforcedPowerLimit", handle) or get("nvmlDeviceGetPowerManagementLimit", handle)
    clock_sm = getattr(nvml, "NVML_CLOCK_SM", 1)
    clock_mem = getattr(nvml, "NVML_CLOCK_MEM", 2)
    links = None
    if hasattr(nvml, "nvmlDeviceGetNvLinkState"):
        # A GPU without NVLink answers "not supported" for every link: that reads as 0 active links.
        enabled = getattr(nvml, "NVML_FEATURE_ENABLED", 1)
        max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))
        links = sum(1 for link in range(max_links) if get("nvmlDeviceGetNvLinkState", handle, link) == enabled)
    uuid = get("nvmlDeviceGetUUID", handle)
    return GpuInfo(
        index=index,
        name=_text(name) if name is not None else f"GPU {index}",
        uuid=_text(uuid) if uuid is not None else None,
        pci_bus_id=_text(bus) if bus is not None else None,
        memory_total_bytes=int(mem.total) if mem is not None else None,
        memory_free_bytes=int(mem.free) if mem is not None else None,
        memory_used_bytes=int(mem.used) if mem is not None else None,
        compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
        sm_count=int(sm_count) if sm_count else None,
        clock_sm_max_mhz=get("nvmlDeviceGetMaxClockInfo", handle, clock_sm),
        clock_mem_max_mhz=get("nvmlDeviceGetMaxClockInfo", handle, clock_mem),
        clock_sm_current_mhz=get("nvmlDeviceGetClockInfo", handle, clock_sm),
        power_limit_w=round(power_mw / 1000.0, 1) if power_mw else None,
        pcie_gen_current=get("nvmlDeviceGetCurrPcieLinkGeneration", handle),
        pcie_gen_max=get("nvmlDeviceGetMaxPcieLinkGeneration", handle),
        pcie_width_current=get("nvmlDeviceGetCurrPcieLinkWidth", handle),
        pcie_width_max=get("nvmlDeviceGetMaxPcieLinkWidth", handle),
        nvlink_links_active=links,
    )
