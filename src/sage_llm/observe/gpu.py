"""NVML facade: the only module that touches pynvml (nvidia-ml-py).

* Initialised lazily on first use, never at import. On a machine with no NVIDIA driver, `pynvml` is not even imported
  (importing it costs ~60 ms of ctypes set-up, which `status --json` cannot afford): a cheap look for the driver's
  device files comes first.
* A machine without a driver, or where NVML fails to start, gives zero GPUs plus a one-line reason (`error()`,
  `Snapshot.error`), never an exception.
* Every query has a default: a field the driver does not support (or an NVML error on one call) reads as None, shown
  as "n/a" to people.
* GPUs are identified by UUID (indices follow NVML's PCI-bus order, which is not CUDA's default order).
* Per-process memory merges compute and graphics processes (a process in both lists is counted once).

Tests inject a fake module with the same functions as pynvml through `set_backend()`.
"""

from __future__ import annotations

import _thread
import atexit
import os
from collections.abc import Callable, Iterable

from sage_llm.core.errors import UsageError
from sage_llm.core.records import Record, asdict, field

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any

_lock = _thread.RLock()  # _thread, not threading: `status` imports this module and starts no thread
_state: dict[str, Any] = {"init": False, "error": None, "nvml": None, "backend": None}

# Files that exist wherever an NVIDIA driver is usable (bare metal, containers with the NVIDIA runtime, WSL).
DRIVER_MARKERS = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/dxg")
NO_DRIVER = "no NVIDIA driver found on this machine (no /dev/nvidiactl), so no GPU is visible"


def driver_present() -> bool:
    """Whether an NVIDIA driver may be usable here (a file check: nothing is loaded)."""
    return any(os.path.exists(p) for p in DRIVER_MARKERS)


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if "LibraryNotFound" in name:
        return "NVML library not found (libnvidia-ml.so): no NVIDIA driver on this machine"
    if "DriverNotLoaded" in name:
        return "the NVIDIA driver is not loaded"
    if "NoPermission" in name:
        return "no permission to talk to the NVIDIA driver (NVML)"
    if "LibRmVersionMismatch" in name:
        return "NVIDIA driver/library version mismatch (a driver update needs a reboot)"
    text = str(exc).strip() or name
    return f"NVML unavailable: {text}"


def _nvml() -> Any | None:
    """The initialised NVML module, or None (and `_state['error']` says why)."""
    with _lock:
        if _state["init"]:
            return _state["nvml"]
        _state["init"] = True
        module = _state["backend"]
        if module is None:
            if not driver_present():
                _state["error"] = NO_DRIVER
                return None
            try:
                import pynvml as module  # nvidia-ml-py
            except ImportError:
                _state["error"] = "nvidia-ml-py (pynvml) is not installed"
                return None
        try:
            module.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, NoPermission, ...
            _state["error"] = _reason(exc)
            return None
        _state["nvml"] = module
        _state["error"] = None
        atexit.register(_shutdown, module)
        return module


def _shutdown(module: Any) -> None:
    try:
        module.nvmlShutdown()
    except Exception:
        pass


def set_backend(module: Any | None) -> None:
    """Use `module` (anything with pynvml's functions) instead of pynvml; initialised lazily like pynvml.

    `set_backend(None)` goes back to the real pynvml.
    """
    with _lock:
        _state.update(init=False, nvml=None, error=None, backend=module)


def reset() -> None:
    """Forget the initialisation (and any injected backend)."""
    set_backend(None)


def initialised() -> bool:
    return bool(_state["init"])


def error() -> str | None:
    """Why NVML is unavailable, or None."""
    _nvml()
    return _state["error"]


def _q(fn: Callable[..., Any] | None, *args: Any, default: Any = None) -> Any:
    """Call an NVML function; any exception (unsupported field, lost GPU, missing symbol) gives `default`."""
    if fn is None:
        return default
    try:
        value = fn(*args)
    except Exception:
        return default
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value


def _num(value: Any) -> int | None:
    """An NVML integer, or None for "not available" (NVML_VALUE_NOT_AVAILABLE is all ones) and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if value < 0 or value >= 2**63 or value in (2**32 - 1,):
        return None
    return value


class GpuInfo(Record):
    index: int
    uuid: str | None
    name: str | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_percent: int | None
    temperature_c: int | None
    power_draw_w: float | None
    power_limit_w: float | None
    memory_free_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.memory_free_bytes is None and self.memory_total_bytes is not None \
                and self.memory_used_bytes is not None:
            self.memory_free_bytes = max(0, self.memory_total_bytes - self.memory_used_bytes)

    @property
    def label(self) -> str:
        return f"GPU {self.index}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class GpuProcess(Record):
    pid: int
    gpu_index: int
    gpu_uuid: str | None
    used_memory_bytes: int | None  # None: the driver does not say (MIG, WDDM)
    type: str = "C"  # C (compute), G (graphics) or C+G


class Snapshot(Record):
    gpus: list[GpuInfo] = field(default_factory=list)
    processes: list[GpuProcess] = field(default_factory=list)
    error: str | None = None

    def by_uuid(self) -> dict[str, GpuInfo]:
        return {g.uuid: g for g in self.gpus if g.uuid}

    def processes_on(self, index: int) -> list[GpuProcess]:
        return [p for p in self.processes if p.gpu_index == index]


def gpu_count() -> int:
    """Number of GPUs NVML sees; 0 without a driver."""
    nv = _nvml()
    if nv is None:
        return 0
    return _num(_q(getattr(nv, "nvmlDeviceGetCount", None), default=0)) or 0


def _device(nv: Any, index: int, handle: Any) -> GpuInfo:
    mem = _q(getattr(nv, "nvmlDeviceGetMemoryInfo", None), handle)
    util = _q(getattr(nv, "nvmlDeviceGetUtilizationRates", None), handle)
    power = _num(_q(getattr(nv, "nvmlDeviceGetPowerUsage", None), handle))  # milliwatts
    limit = _num(_q(getattr(nv, "nvmlDeviceGetEnforcedPowerLimit", None), handle))
    temp = _num(_q(getattr(nv, "nvmlDeviceGetTemperature", None), handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0)))
    return GpuInfo(
        index=index,
        uuid=_q(getattr(nv, "nvmlDeviceGetUUID", None), handle) or None,
        name=_q(getattr(nv, "nvmlDeviceGetName", None), handle) or None,
        memory_used_bytes=_num(getattr(mem, "used", None)),
        memory_total_bytes=_num(getattr(mem, "total", None)),
        memory_free_bytes=_num(getattr(mem, "free", None)),
        utilization_percent=_num(getattr(util, "gpu", None)),
        temperature_c=temp,
        power_draw_w=power / 1000.0 if power is not None else None,
        power_limit_w=limit / 1000.0 if limit is not None else None,
    )


def _processes(nv: Any, info: GpuInfo, handle: Any) -> list[GpuProcess]:
    merged: dict[int, GpuProcess] = {}
    lists = (("C", "nvmlDeviceGetComputeRunningProcesses"), ("G", "nvmlDeviceGetGraphicsRunningProcesses"))
    for kind, fn_name in lists:
        for p in _q(getattr(nv, fn_name, None), handle, default=None) or []:
            pid = _num(getattr(p, "pid", None))
            if pid is None:
                continue
            used = _num(getattr(p, "usedGpuMemory", None))
            prev = merged.get(pid)
            if prev is None:
                merged[pid] = GpuProcess(pid, info.index, info.uuid, used, kind)
            else:
                # the same process in both lists: NVML reports its memory on this GPU in each, so count it once
                prev.type = "C+G"
                if used is not None:
                    prev.used_memory_bytes = max(prev.used_memory_bytes or 0, used)
    return list(merged.values())


def snapshot(with_processes: bool = True) -> Snapshot:
    """All GPUs (and, optionally, the processes on them), read in one go. Never raises."""
    nv = _nvml()
    if nv is None:
        return Snapshot(error=_state["error"])
    snap = Snapshot()
    count = _num(_q(getattr(nv, "nvmlDeviceGetCount", None), default=None))
    if count is None:
        snap.error = "NVML is loaded but cannot count the GPUs"
        return snap
    for i in range(count):
        handle = _q(getattr(nv, "nvmlDeviceGetHandleByIndex", None), i)
        if handle is None:
            # a GPU that fell off the bus or that we may not access: keep its row, with nothing known
            snap.gpus.append(GpuInfo(i, None, None, None, None, None, None, None, None))
            continue
        info = _device(nv, i, handle)
        snap.gpus.append(info)
        if with_processes:
            snap.processes.extend(_processes(nv, info, handle))
    return snap


def gpus() -> list[GpuInfo]:
    return snapshot(with_processes=False).gpus


# ------------------------------------------------------------------------------------------------------ selection
def parse_gpus(spec: str, available: Iterable[GpuInfo]) -> list[GpuInfo]:
    """The GPUs named by `spec`: comma-separated NVML indices ("0,1"), full UUIDs ("GPU-8e8c...") or unique UUID
    prefixes of at least 8 characters. Raises UsageError (exit 2) naming the bad item."""
    gpus_ = list(available)
    items = [s.strip() for s in (spec or "").split(",")]
    if not items or any(not s for s in items):
        raise UsageError(f"--gpus {spec!r} is empty or has an empty item", hint="e.g. --gpus 0,1 or --gpus GPU-8e8c...")
    have = ", ".join(str(g.index) for g in gpus_) or "none"
    chosen: list[GpuInfo] = []
    for item in items:
        if item.isdigit():
            match = [g for g in gpus_ if g.index == int(item)]
            if not match:
                raise UsageError(f"no GPU {item} on this machine (GPUs: {have})",
                                 hint="see `sage-llm top` or nvidia-smi")
        else:
            low = item.lower()
            match = [g for g in gpus_ if g.uuid and g.uuid.lower() == low]
            if not match:
                if len(item) < 8:
                    raise UsageError(f"--gpus item {item!r} is neither an index nor a GPU UUID",
                                     hint="use indices like 0,1 or UUIDs like GPU-8e8c1a2b")
                match = [g for g in gpus_ if g.uuid and g.uuid.lower().startswith(low)]
                if not match and not low.startswith(("gpu-", "mig-")):
                    match = [g for g in gpus_ if g.uuid and g.uuid.lower().startswith("gpu-" + low)]
            if not match:
                raise UsageError(f"no GPU with UUID {item} on this machine (GPUs: {have})",
                                 hint="`nvidia-smi -L` lists the UUIDs")
            if len(match) > 1:
                raise UsageError(f"GPU UUID prefix {item!r} matches {len(match)} GPUs",
                                 hint="give more characters of the UUID")
        if any(g.index == match[0].index for g in chosen):
            raise UsageError(f"GPU {item} is listed twice in --gpus {spec!r}", hint="name each GPU once")
        chosen.append(match[0])
    return chosen


def cuda_visible_devices(chosen: Iterable[GpuInfo]) -> tuple[str, dict[str, str]]:
    """(CUDA_VISIBLE_DEVICES value, extra variables) for the chosen GPUs: UUIDs when known (CUDA and NVML order
    devices differently), else indices with CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA counts the way NVML does."""
    chosen = list(chosen)
    if all(g.uuid for g in chosen):
        return ",".join(g.uuid for g in chosen if g.uuid), {}
    return ",".join(str(g.index) for g in chosen), {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def driver_version() -> tuple[str | None, str | None]:
    """(NVIDIA driver version, CUDA version the driver supports, e.g. "12.4"); (None, None) without NVML."""
    nv = _nvml()
    if nv is None:
        return None, None
    drv = _q(getattr(nv, "nvmlSystemGetDriverVersion", None))
    if isinstance(drv, bytes):
        drv = drv.decode("utf-8", "replace")
    cuda = _num(_q(getattr(nv, "nvmlSystemGetCudaDriverVersion", None)))
    return (str(drv) if drv else None), (f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None)
