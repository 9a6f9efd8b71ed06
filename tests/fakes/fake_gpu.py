#!/usr/bin/env python3
"""GPU memory for the stand-in engine and the GPU check (scripts/gpu_check.py): real with torch, or a file ledger.

Three ways to "hold GPU memory", picked by `allocate()`:
  * FAKE_GPU_LEDGER=DIR set: write DIR/proc-<pid>.json ({pid, bytes, cuda_visible_devices}); `LedgerNVML` (a
    FakeNVML, tests/fakes/fake_nvml.py) and the fake `nvidia-smi` below read that ledger, so a process "holds" the
    memory until it exits, as with a real driver. This is how the GPU check runs on a machine with no GPU.
  * else, torch with CUDA importable: `torch.empty(n, dtype=torch.uint8, device="cuda")` on the device that
    CUDA_VISIBLE_DEVICES selects (sage-llm sets it by UUID);
  * else nothing (a CPU machine): the process holds no GPU memory.

The ledger describes the fake GPUs in DIR/gpus.json: [{"name", "total", "baseline", "uuid"?, "util", "temp",
"power_mw", "limit_mw"}]. Each process on a fake GPU also "uses" CONTEXT_BYTES for its CUDA context, like a real one.

Command line (stdlib only, so it runs with any python3):
  fake_gpu.py hold BYTES              hold BYTES until SIGTERM/SIGINT; prints "HOLDING <how> <bytes>" once held
  fake_gpu.py nvidia-smi ARGS...      the subset of `nvidia-smi` the GPU check uses (-L, --query-gpu,
                                      --query-compute-apps, no arguments), answered from FAKE_GPU_LEDGER
  fake_gpu.py init DIR [N]            write DIR/gpus.json with N fake H200s (default 1)

FAKE_GPU_SMI_SKEW=0.05 makes the fake nvidia-smi report 5 % more per-process memory than NVML does (a fault to
prove the check's comparison can fail).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

GiB = 1024**3
MiB = 1024**2
CONTEXT_BYTES = 512 * MiB  # a CUDA context on a recent GPU costs about this much
LEDGER_ENV = "FAKE_GPU_LEDGER"

_held: list[Any] = []  # keeps torch tensors alive for the life of the process


# ------------------------------------------------------------------------------------------------------ ledger
def init_ledger(root: Path, count: int = 1, name: str = "NVIDIA H200 (fake)", total: int = 141 * GiB) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    gpus = [{"name": name, "total": total, "baseline": (512 + 64 * i) * MiB,
             "uuid": f"GPU-fa4e{i:04d}-0000-4000-8000-{i:012d}", "util": 3 * i, "temp": 31 + i,
             "power_mw": 74_000 + 1000 * i, "limit_mw": 700_000} for i in range(count)]
    (root / "gpus.json").write_text(json.dumps(gpus, indent=1))
    return gpus


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has released its memory, as with a real driver
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def read_ledger(root: Path) -> tuple[list[dict], dict[int, list[tuple[int, int]]]]:
    """(gpus, {gpu index: [(pid, bytes incl. context)]}) for the processes still alive."""
    gpus = json.loads((root / "gpus.json").read_text())
    by_uuid = {g["uuid"]: i for i, g in enumerate(gpus)}
    procs: dict[int, list[tuple[int, int]]] = {}
    for f in sorted(root.glob("proc-*.json")):
        try:
            entry = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # being written
        if not _alive(entry["pid"]):
            continue
        visible = [v.strip() for v in (entry.get("cuda_visible_devices") or "").split(",") if v.strip()]
        first = visible[0] if visible else "0"
        index = by_uuid.get(first, int(first) if first.isdigit() else None)
        if index is None or not 0 <= index < len(gpus):
            continue  # CUDA would see no such device
        procs.setdefault(index, []).append((entry["pid"], entry["bytes"] + CONTEXT_BYTES))
    return gpus, procs


# --------------------------------------------------------------------------------------------------- allocate
def allocate(nbytes: int) -> str:
    """Hold `nbytes` of GPU memory for the rest of this process; returns how: "ledger", "torch" or "none"."""
    ledger = os.environ.get(LEDGER_ENV)
    if ledger:
        root = Path(ledger)
        entry = {"pid": os.getpid(), "bytes": int(nbytes),
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        tmp = root / f".proc-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, root / f"proc-{os.getpid()}.json")
        return "ledger"
    try:
        import torch
    except ImportError:
        return "none"
    if not torch.cuda.is_available():
        return "none"
    _held.append(torch.empty(int(nbytes), dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    return "torch"


def release() -> None:
    ledger = os.environ.get(LEDGER_ENV)
    if ledger:
        try:
            (Path(ledger) / f"proc-{os.getpid()}.json").unlink()
        except OSError:
            pass
    _held.clear()


# ----------------------------------------------------------------------------------------------------- NVML
def ledger_nvml(root: Path) -> Any:
    """A FakeNVML whose devices and processes are re-read from the ledger on every call."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.append(here)
    from fake_nvml import FakeGpu, FakeNVML, FakeProc

    class LedgerNVML(FakeNVML):
        def _check(self, name: str, index: int | None = None) -> None:
            if name in ("nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex"):
                self._refresh()
            super()._check(name, index)

        def _refresh(self) -> None:
            gpus, procs = read_ledger(root)
            self.devices = [FakeGpu(total=g["total"], used=g["baseline"] + sum(b for _p, b in procs.get(i, [])),
                                    name=g["name"], uuid=g["uuid"], util=g.get("util"), temp=g.get("temp"),
                                    power_mw=g.get("power_mw"), limit_mw=g.get("limit_mw"))
                            for i, g in enumerate(gpus)]
            self.processes = {i: [FakeProc(pid, b) for pid, b in ps] for i, ps in procs.items()}

        def nvmlSystemGetDriverVersion(self) -> str:
            return "999.99-fake"

        def nvmlSystemGetCudaDriverVersion(self) -> int:
            return 12080

    nv = LedgerNVML()
    nv._refresh()
    return nv


# ----------------------------------------------------------------------------------------------- nvidia-smi
def nvidia_smi(argv: list[str]) -> int:
    """Answer `--query-compute-apps=pid,used_memory` and `--query-gpu=...` (csv, noheader, nounits) from the ledger."""
    root = Path(os.environ[LEDGER_ENV])
    gpus, procs = read_ledger(root)
    if argv in ([], ["-L"]):
        if not argv:
            print("fake nvidia-smi (tests/fakes/fake_gpu.py)   Driver Version: 999.99-fake   CUDA Version: 12.8")
        for i, g in enumerate(gpus):
            print(f"GPU {i}: {g['name']} (UUID: {g['uuid']})")
        return 0
    query = next((a for a in argv if a.startswith("--query-")), None)
    fmt = next((a.split("=", 1)[1] for a in argv if a.startswith("--format=")), "")
    if query is None or fmt.replace(" ", "") != "csv,noheader,nounits":
        print("fake nvidia-smi: only --query-gpu/--query-compute-apps with --format=csv,noheader,nounits",
              file=sys.stderr)
        return 2
    what, fields = query.split("=", 1)
    skew = float(os.environ.get("FAKE_GPU_SMI_SKEW", "0"))
    if what == "--query-compute-apps":
        for i in sorted(procs):
            for pid, used in procs[i]:
                row = {"pid": pid, "used_memory": int(used * (1 + skew)) // MiB, "gpu_uuid": gpus[i]["uuid"],
                       "process_name": "python3"}
                print(", ".join(str(row[f]) for f in fields.split(",")))
        return 0
    if what == "--query-gpu":
        for i, g in enumerate(gpus):
            used = g["baseline"] + sum(b for _p, b in procs.get(i, []))
            row = {"index": i, "uuid": g["uuid"], "name": g["name"], "memory.total": g["total"] // MiB,
                   "memory.used": used // MiB, "memory.free": (g["total"] - used) // MiB,
                   "driver_version": "999.99-fake", "utilization.gpu": g.get("util"),
                   "temperature.gpu": g.get("temp"), "power.draw": g.get("power_mw", 0) / 1000}
            print(", ".join(str(row[f]) for f in fields.split(",")))
        return 0
    print(f"fake nvidia-smi: unsupported {what}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------------- hold
def hold(nbytes: int) -> int:
    def bye(signum: int, frame: Any) -> None:
        release()
        os._exit(0)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
    how = allocate(nbytes)
    print(f"HOLDING {how} {nbytes}", flush=True)
    while True:
        time.sleep(3600)


def main(argv: list[str]) -> int:
    if argv[:1] == ["hold"] and len(argv) == 2:
        return hold(int(argv[1]))
    if argv[:1] == ["nvidia-smi"]:
        return nvidia_smi(argv[1:])
    if argv[:1] == ["init"] and len(argv) in (2, 3):
        init_ledger(Path(argv[1]), int(argv[2]) if len(argv) == 3 else 1)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
