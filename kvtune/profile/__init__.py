"""Profiling: the machine (NVML, measured copy rates, host, disk), the traffic (request traces) and the model
(KV bytes per token, capacity), written as one profile YAML that ``kvtune recommend --profile`` reads.

Public surface (the modules behind it are implementation detail):
"""

from kvtune.profile.hardware import list_reference_hardware, probe_hardware, reference_hardware
from kvtune.profile.schema import (
    SCHEMA_VERSION,
    BandwidthSample,
    CapacityRow,
    CapacityTable,
    GpuInfo,
    HardwareProfile,
    LengthStats,
    ModelRecord,
    Profile,
    WorkloadProfile,
    dump_profile,
    load_profile,
)
from kvtune.profile.workload import TraceRequest, bundled_trace_path, default_workload, iter_requests, read_trace

__all__ = [
    "SCHEMA_VERSION", "BandwidthSample", "CapacityRow", "CapacityTable", "GpuInfo", "HardwareProfile", "LengthStats",
    "ModelRecord", "Profile", "TraceRequest", "WorkloadProfile", "bundled_trace_path", "default_workload", "dump_profile", "list_reference_hardware",
    "iter_requests", "load_profile", "probe_hardware", "read_trace", "reference_hardware",
]
