"""NVML facade: the only module that touches pynvml.

Initialised lazily on first use (never at import). A machine with no driver gives zero GPUs plus a reason, not an
exception. Every query has a default, so a field the driver does not support reads as None ("n/a" for people).
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_state: dict[str, Any] = {"init": False, "error": None, "nvml": None}


def _nvml() -> Any | None:
    """The initialised pynvml module, or None (and `_state['error']` says why)."""
    with _lock:
        if _state["init"]:
            return _state["nvml"]
        _state["init"] = True
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
        except ImportError:
            _state["error"] = "nvidia-ml-py (pynvml) is not installed"
            return None
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            name = type(exc).__name__
            if "LibraryNotFound" in name:
                _state["error"] = "NVML library not found (no NVIDIA driver on this machine)"
            elif "DriverNotLoaded" in name:
                _state["error"] = "the NVIDIA driver is not loaded"
            else:
                _state["error"] = f"NVML unavailable: {exc}"
            return None
        _state["nvml"] = pynvml
        atexit.register(_shutdown)
        return pynvml


def _shutdown() -> None:
    nv = _state.get("nvml")
    if nv is not None:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


def set_backend(module: Any | None, error: str | None = None) -> None:
    """Inject an NVML implementation (tests use a fake with the same functions as pynvml)."""
    with _lock:
        _state.update(init=True, nvml=module, error=error)
        if module is not None:
            module.nvmlInit()


def reset() -> None:
    with _lock:
        _state.update(init=False, nvml=None, error=None)


def error() -> str | None:
    """Why NVML is unavailable, or None."""
    _nvml()
    return _state["error"]


def _q(fn: Callable[..., T], *args: Any, default: Any = None) -> Any:
    try:
        value = fn(*args)
    except Exception:
        return default
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value


@dataclass
class GpuInfo:
    index: int
    uuid: str | None
    name: str | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_percent: int | None
    temperature_c: int | None
    power_draw_w: float | None
    power_limit_w: float | None

    @property
    def memory_free_bytes(self) -> int | None:
        if self.memory_total_bytes is None or self.memory_used_bytes is None:
            return None
        return self.memory_total_bytes - self.memory_used_bytes

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory_free_bytes"] = self.memory_free_bytes
        return d


@dataclass
class GpuProcess:
    pid: int
    gpu_index: int
    gpu_uuid: str | None
    used_memory_bytes: int | None


@dataclass
class Snapshot:
    gpus: list[GpuInfo] = field(default_factory=list)
    processes: list[GpuProcess] = field(default_factory=list)
    error: str | None = None


def gpu_count() -> int:
    nv = _nvml()
    if nv is None:
        return 0
    return int(_q(nv.nvmlDeviceGetCount, default=0) or 0)


def snapshot(with_processes: bool = True) -> Snapshot:
    """All GPUs and (optionally) their processes, read in one go."""
    nv = _nvml()
    if nv is None:
        return Snapshot(error=_state["error"])
    snap = Snapshot()
    for i in range(gpu_count()):
        handle = _q(nv.nvmlDeviceGetHandleByIndex, i)
        if handle is None:
            continue
        mem = _q(nv.nvmlDeviceGetMemoryInfo, handle)
        util = _q(nv.nvmlDeviceGetUtilizationRates, handle)
        power = _q(nv.nvmlDeviceGetPowerUsage, handle)
        limit = _q(nv.nvmlDeviceGetEnforcedPowerLimit, handle)
        temp = _q(nv.nvmlDeviceGetTemperature, handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
        info = GpuInfo(
            index=i,
            uuid=_q(nv.nvmlDeviceGetUUID, handle),
            name=_q(nv.nvmlDeviceGetName, handle),
            memory_used_bytes=getattr(mem, "used", None),
            memory_total_bytes=getattr(mem, "total", None),
            utilization_percent=getattr(util, "gpu", None),
            temperature_c=temp,
            power_draw_w=power / 1000.0 if isinstance(power, (int, float)) else None,
            power_limit_w=limit / 1000.0 if isinstance(limit, (int, float)) else None,
        )
        snap.gpus.append(info)
        if with_processes:
            seen: dict[int, GpuProcess] = {}
            for fn_name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                fn = getattr(nv, fn_name, None)
                for p in (_q(fn, handle, default=[]) if fn else []) or []:
                    used = getattr(p, "usedGpuMemory", None)
                    if not isinstance(used, int) or used < 0 or used >= 2**63:
                        used = None
                    prev = seen.get(p.pid)
                    if prev is None:
                        seen[p.pid] = GpuProcess(p.pid, i, info.uuid, used)
                    elif used is not None:
                        prev.used_memory_bytes = (prev.used_memory_bytes or 0) + used
            snap.processes.extend(seen.values())
    return snap
