"""Fakes for the library boundaries the hardware probe crosses: the NVML module and torch's CUDA calls."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - mirrors pynvml's name
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    pass


class FakeNvml:
    """Answers like pynvml for ``gpus`` (dicts); a missing key raises NVMLError_NotSupported like the driver."""

    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_FEATURE_ENABLED = 1
    NVML_NVLINK_MAX_LINKS = 18

    def __init__(self, gpus: list[dict], *, missing_library: bool = False):
        self.gpus = gpus
        self.missing_library = missing_library
        self.shutdown_called = False

    def nvmlInit(self):
        if self.missing_library:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdown_called = True

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return 12040

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def _field(self, h, key):
        if key not in h:
            raise NVMLError_NotSupported(key)
        return h[key]

    def nvmlDeviceGetName(self, h):
        return self._field(h, "name")

    def nvmlDeviceGetUUID(self, h):
        return self._field(h, "uuid")

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self._field(h, "bus"))

    def nvmlDeviceGetMemoryInfo(self, h):
        total, used = self._field(h, "mem")
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self._field(h, "cc")

    def nvmlDeviceGetAttributes_v2(self, h):
        return SimpleNamespace(multiprocessorCount=self._field(h, "sms"))

    def nvmlDeviceGetMaxClockInfo(self, h, which):
        return self._field(h, "max_clocks")[which]

    def nvmlDeviceGetClockInfo(self, h, which):
        return self._field(h, "clocks")[which]

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._field(h, "power_mw")

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return self._field(h, "pcie")[0]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return self._field(h, "pcie")[1]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return self._field(h, "pcie")[2]

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return self._field(h, "pcie")[3]

    def nvmlDeviceGetNvLinkState(self, h, link):
        links = self._field(h, "nvlinks")
        if link >= links:
            raise NVMLError_NotSupported("link")
        return self.NVML_FEATURE_ENABLED


GiB = 1 << 30

H100_SXM = {
    "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0000", "bus": "00000000:19:00.0", "mem": (81559 * (1 << 20), 600 << 20),
    "cc": (9, 0), "sms": 132, "max_clocks": {1: 1980, 2: 2619}, "clocks": {1: 345, 2: 2619}, "power_mw": 700000,
    "pcie": (1, 5, 16, 16), "nvlinks": 18,
}
L4 = {"name": "NVIDIA L4", "mem": (23034 * (1 << 20), 0), "cc": (8, 9), "pcie": (4, 4, 16, 16)}  # sparse answers


class FakeClock:
    now = 0.0  # seconds of simulated GPU time


class FakeTensor:
    """A byte buffer that knows where it lives; copy_ advances the fake clock at the configured rate."""

    def __init__(self, torch, n, device, pinned):
        self.torch, self.n, self.device, self.pinned = torch, n, device, pinned

    def __getitem__(self, sl):
        n = len(range(*sl.indices(self.n)))
        return FakeTensor(self.torch, n, self.device, self.pinned)

    def copy_(self, src, non_blocking=False):
        t = self.torch
        if self.device.startswith("cuda") and src.device.startswith("cuda"):
            secs = 2 * self.n / (t.rates["d2d"] * 1e9)
        else:
            direction = "h2d" if self.device.startswith("cuda") else "d2h"
            host = src if direction == "h2d" else self
            key = f"{direction}_{'pinned' if host.pinned else 'pageable'}"
            secs = self.n / (t.rates[key] * 1e9) + t.latency_s
        t.clock.now += secs
        t.copies.append((src.device, self.device, self.n))
        return self


class FakeEvent:
    def __init__(self, torch, enable_timing=False):
        self.torch, self.t = torch, None

    def record(self, stream=None):
        self.t = self.torch.clock.now

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3  # milliseconds, like torch


class FakeTorch:
    """The slice of torch that ``bandwidth.measure_gpu`` and ``probe_hardware`` use."""

    uint8 = "uint8"

    def __init__(self, rates=None, free=70 * GiB, available=True, latency_s=0.0):
        self.rates = rates or {"d2d": 3000.0, "h2d_pinned": 55.0, "d2h_pinned": 52.0, "h2d_pageable": 20.0,
                               "d2h_pageable": 12.0}
        self.latency_s = latency_s
        self.clock = FakeClock()
        self.copies: list = []
        self.allocs: list = []
        me = self
        self.version = SimpleNamespace(cuda="12.4")
        self.cuda = SimpleNamespace(
            is_available=lambda: available,
            Event=lambda enable_timing=False: FakeEvent(me, enable_timing),
            synchronize=lambda device=None: None,
            device=lambda index: contextlib.nullcontext(),
            mem_get_info=lambda index=0: (free, 80 * GiB),
        )

    def empty(self, n, dtype=None, device="cpu", pin_memory=False):
        self.allocs.append((n, device, pin_memory))
        return FakeTensor(self, n, device, pin_memory)
