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
from kvtune.profile.workload import default_workload, read_trace

__all__ = [
    "SCHEMA_VERSION", "BandwidthSample", "CapacityRow", "CapacityTable", "GpuInfo", "HardwareProfile", "LengthStats",
    "ModelRecord", "Profile", "WorkloadProfile", "default_workload", "dump_profile", "list_reference_hardware",
    "load_profile", "probe_hardware", "read_trace", "reference_hardware",
]
