"""A fake of the pynvml module for tests: device and process tables you control, NVML errors, missing fields.

    nv = FakeNVML([FakeGpu(total=80 * GiB, used=10 * GiB)], processes={0: [FakeProc(1234, 9 * GiB)]})
    gpu.set_backend(nv)

Every function the facade calls is here with pynvml's name and signature. `fail(name, error, index=None)` makes one
function raise for one GPU (or all of them); `init_error` makes nvmlInit raise (e.g. `NVMLError_LibraryNotFound`).
`calls` counts calls per function name, so tests can assert that nothing touched NVML.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

GiB = 1024**3
NVML_TEMPERATURE_GPU = 0
NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE_ulonglong as Python sees it


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_DriverNotLoaded(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_NoPermission(NVMLError):
    pass


class NVMLError_Uninitialized(NVMLError):
    pass


@dataclass
class FakeGpu:
    total: int = 80 * GiB
    used: int = 0
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str | None = None  # default: GPU-0000000N-...
    util: int | None = 0
    temp: int | None = 40
    power_mw: int | None = 70_000
    limit_mw: int | None = 700_000


@dataclass
class FakeProc:
    pid: int
    used: int | None  # None -> NVML_VALUE_NOT_AVAILABLE (MIG, WDDM)
    graphics: bool = False  # listed by nvmlDeviceGetGraphicsRunningProcesses instead of the compute list
    both: bool = False  # listed by both


@dataclass
class FakeNVML:
    devices: list[FakeGpu] = field(default_factory=list)
    processes: dict[int, list[FakeProc]] = field(default_factory=dict)
    init_error: type[Exception] | None = None
    calls: Counter = field(default_factory=Counter)
    failures: dict[tuple[str, int | None], type[Exception]] = field(default_factory=dict)
    initialised: bool = False

    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVMLError = NVMLError

    def __post_init__(self) -> None:
        for i, d in enumerate(self.devices):
            if d.uuid is None:
                d.uuid = f"GPU-{i:08d}-aaaa-bbbb-cccc-{i:012d}"

    # ---- test controls ----
    def fail(self, name: str, error: type[Exception] = NVMLError_NotSupported, index: int | None = None) -> None:
        self.failures[(name, index)] = error

    def _check(self, name: str, index: int | None = None) -> None:
        self.calls[name] += 1
        if name != "nvmlInit" and not self.initialised:
            raise NVMLError_Uninitialized("Uninitialized")
        err = self.failures.get((name, index)) or self.failures.get((name, None))
        if err is not None:
            raise err(name)

    def _dev(self, handle: Any) -> tuple[int, FakeGpu]:
        return handle.index, self.devices[handle.index]

    # ---- pynvml API ----
    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise self.init_error("NVML Shared Library Not Found")
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.calls["nvmlShutdown"] += 1
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._check("nvmlDeviceGetHandleByIndex", index)
        if not 0 <= index < len(self.devices):
            raise NVMLError("Invalid Argument")
        return SimpleNamespace(index=index)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        i, d = self._dev(handle)
        self._check("nvmlDeviceGetUUID", i)
        return d.uuid or ""

    def nvmlDeviceGetName(self, handle: Any) -> bytes:
        i, d = self._dev(handle)
        self._check("nvmlDeviceGetName", i)
        return d.name.encode()  # older pynvml returned bytes: the facade decodes

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        i, d = self._dev(handle)
        self._check("nvmlDeviceGetMemoryInfo", i)
        return SimpleNamespace(total=d.total, used=d.used, free=d.total - d.used)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        i, d = self._dev(handle)
        self._check("nvmlDeviceGetUtilizationRates", i)
        if d.util is None:
            raise NVMLError_NotSupported("Not Supported")
        return SimpleNamespace(gpu=d.util, memory=0)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        i, d = self._dev(handle)
        self._check("nvmlDeviceGetTemperature", i)
        if d.temp is None:
            raise NVMLError_NotSupported("Not Supported")
        return d.temp

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        i, d = self._dev(handle)
        self._check("nvmlDeviceGetPowerUsage", i)
        if d.power_mw is None:
            raise NVMLError_NotSupported("Not Supported")
        return d.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        i, d = self._dev(handle)
        self._check("nvmlDeviceGetEnforcedPowerLimit", i)
        if d.limit_mw is None:
            raise NVMLError_NotSupported("Not Supported")
        return d.limit_mw

    def _procs(self, handle: Any, graphics: bool, name: str) -> list[Any]:
        i, _d = self._dev(handle)
        self._check(name, i)
        out = []
        for p in self.processes.get(i, []):
            if p.both or p.graphics == graphics:
                used = NOT_AVAILABLE if p.used is None else p.used
                out.append(SimpleNamespace(pid=p.pid, usedGpuMemory=used, gpuInstanceId=NOT_AVAILABLE,
                                           computeInstanceId=NOT_AVAILABLE))
        return out

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        return self._procs(handle, False, "nvmlDeviceGetComputeRunningProcesses")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        return self._procs(handle, True, "nvmlDeviceGetGraphicsRunningProcesses")
