"""GPU placement and the pre-flight memory check for `start`. Pure decisions over an NVML snapshot; no processes.

* `--gpus 0,1` (indices or UUIDs) picks the GPUs; otherwise the engine gets the GPUs with the most free memory, as
  many as it has ranks (tensor x pipeline x data parallel). The choice reaches vLLM as CUDA_VISIBLE_DEVICES (by UUID)
  and is recorded in the engine record (`EngineRecord.gpus`).
* Before spawning, every chosen GPU must have `--gpu-memory-utilization x total` free (the check vLLM itself makes
  minutes later, after loading: "Free memory on device ... is less than desired GPU memory utilization"). Memory that
  an engine still starting on that GPU has claimed but not yet allocated counts as taken. A refusal names the engines
  (and other processes) holding memory there. `--skip-checks` turns the check off.
* No GPU (no driver, or a CPU build of vLLM): nothing to place, unless `--gpus` was given, which is then an error.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from sage_llm.core.errors import SageLLMError, UsageError
from sage_llm.observe import gpu

GiB = 1024**3


class InsufficientGpuMemory(SageLLMError):
    """A chosen GPU has less free memory than the engine will ask for."""


@dataclass
class Placement:
    gpus: list[gpu.GpuInfo] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # CUDA_VISIBLE_DEVICES (+ CUDA_DEVICE_ORDER)
    how: str = "none"  # none | --gpus | auto | environment
    notes: list[str] = field(default_factory=list)

    def record(self) -> list[dict[str, Any]]:
        """What goes into EngineRecord.gpus."""
        return [{"index": g.index, "uuid": g.uuid, "name": g.name, "memory_total_bytes": g.memory_total_bytes,
                 "chosen_by": self.how} for g in self.gpus]

    def describe(self) -> str:
        if not self.gpus:
            return "no GPU"
        names = ", ".join(str(g.index) for g in self.gpus)
        return f"GPU {names}" if len(self.gpus) == 1 else f"GPUs {names}"


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.1f} GiB"


def _holders(snap: gpu.Snapshot, g: gpu.GpuInfo, owners: dict[int, str]) -> list[tuple[str, int | None]]:
    """(who, bytes) for every process holding memory on GPU `g`, engine processes summed under the engine."""
    found: dict[str, int | None] = {}
    for p in snap.processes_on(g.index):
        who = owners.get(p.pid) or f"pid {p.pid}"
        prev = found.get(who)
        found[who] = p.used_memory_bytes if prev is None else prev + (p.used_memory_bytes or 0)
    return sorted(found.items(), key=lambda kv: -(kv[1] or 0))


def _owners(live: list[tuple[Any, Any]]) -> dict[int, str]:
    """pid -> "engine 'NAME'" for every process of every live managed engine."""
    owners: dict[int, str] = {}
    for rec, tree in live:
        pids = {getattr(p, "pid", None) for p in getattr(tree, "members", [])} | {rec.pid}
        for pid in pids:
            if pid:
                owners[pid] = f"engine {rec.name!r}"
    return owners


def _pending(snap: gpu.Snapshot, live: list[tuple[Any, Any]], owners: dict[int, str]) -> dict[str, int]:
    """Bytes per GPU UUID that engines placed there have claimed (utilisation x total) but not allocated yet. An
    engine that is ready (`ready_at` in its record) has allocated all it will: the rest of its share is free."""
    out: dict[str, int] = {}
    by_uuid = snap.by_uuid()
    for rec, _tree in live:
        if getattr(rec, "ready_at", None):
            continue
        util = (rec.settings or {}).get("gpu_memory_utilization")
        if not isinstance(util, (int, float)):
            continue
        for placed in rec.gpus or []:
            g = by_uuid.get(placed.get("uuid"))
            if g is None or g.memory_total_bytes is None:
                continue
            held = sum(p.used_memory_bytes or 0 for p in snap.processes_on(g.index)
                       if owners.get(p.pid) == f"engine {rec.name!r}")
            claim = int(util * g.memory_total_bytes) - held
            if claim > 0:
                out[g.uuid or ""] = out.get(g.uuid or "", 0) + claim
    return out


def _free(g: gpu.GpuInfo, pending: dict[str, int]) -> int | None:
    if g.memory_free_bytes is None:
        return None
    return max(0, g.memory_free_bytes - pending.get(g.uuid or "", 0))


def check_memory(snap: gpu.Snapshot, chosen: list[gpu.GpuInfo], utilization: float,
                 live: list[tuple[Any, Any]]) -> None:
    """Raise InsufficientGpuMemory (one line, naming who holds the memory) unless every chosen GPU has
    `utilization x total` free."""
    owners = _owners(live)
    pending = _pending(snap, live, owners)
    for g in chosen:
        free = _free(g, pending)
        if free is None or g.memory_total_bytes is None:
            continue  # the driver does not say: let vLLM judge
        need = utilization * g.memory_total_bytes
        if free >= need:
            continue
        holders = _holders(snap, g, owners)
        held = "; held by " + ", ".join(f"{who} ({_gib(b)})" for who, b in holders[:4]) if holders else ""
        claimed = pending.get(g.uuid or "", 0)
        if claimed:
            held += f"; {_gib(claimed)} more is claimed by engines still starting there"
        fits = math.floor(free / g.memory_total_bytes * 100) / 100
        hint = (f"lower --gpu-memory-utilization to {fits:.2f} or less, " if fits >= 0.05 else "") + \
            "stop an engine there, pick other GPUs with --gpus, or pass --skip-checks"
        raise InsufficientGpuMemory(
            f"GPU {g.index} has {_gib(free)} free of {_gib(g.memory_total_bytes)}, but --gpu-memory-utilization "
            f"{utilization:g} needs {_gib(need)}{held}",
            hint=hint,
        )


def plan(
    needed: int,
    utilization: float,
    gpus_arg: str | None = None,
    skip_checks: bool = False,
    live: list[tuple[Any, Any]] | None = None,
    cpu_engine: bool = False,
    environ: dict[str, str] | None = None,
    snap: gpu.Snapshot | None = None,
) -> Placement:
    """Choose the engine's GPUs and check their free memory. `needed` is the number of GPUs it uses on this node
    (0: its ranks run elsewhere, e.g. on a Ray cluster). Raises UsageError for a bad --gpus, InsufficientGpuMemory
    when the memory is not there."""
    live = live or []
    environ = os.environ if environ is None else environ
    if needed <= 0 and not gpus_arg:
        return Placement()
    if cpu_engine and not gpus_arg:
        return Placement()
    if snap is None:
        snap = gpu.snapshot(with_processes=True)
    if not snap.gpus:
        if gpus_arg:
            why = snap.error or "NVML reports no GPU"
            raise UsageError(f"--gpus {gpus_arg} was given, but no GPU is usable here: {why}",
                             hint="leave --gpus out to run the engine without a GPU")
        return Placement()
    if cpu_engine:
        raise UsageError(f"--gpus {gpus_arg} was given, but the vLLM that would run is a CPU build",
                         hint="install a GPU engine (`sage-llm engine install`) or leave --gpus out")
    how = "--gpus"
    if gpus_arg:
        chosen = gpu.parse_gpus(gpus_arg, snap.gpus)
        if len(chosen) < needed and not skip_checks:
            raise UsageError(f"--gpus {gpus_arg} names {len(chosen)} GPU(s), but the engine needs {needed} "
                             "(tensor x pipeline x data parallel size)",
                             hint=f"name {needed} GPUs, or lower --tensor-parallel-size/--pipeline-parallel-size")
    else:
        candidates = snap.gpus
        inherited = (environ.get("CUDA_VISIBLE_DEVICES") or "").strip()
        if inherited:
            try:
                candidates = gpu.parse_gpus(inherited, snap.gpus)
                how = "environment"
            except UsageError:
                # not something we can map (e.g. MIG ids): respect it and let vLLM use it as it is
                return Placement(how="environment", notes=[f"using CUDA_VISIBLE_DEVICES={inherited} as set"])
        else:
            how = "auto"
        if len(candidates) < needed:
            if not skip_checks:
                raise UsageError(f"the engine needs {needed} GPUs (tensor x pipeline x data parallel size), but only "
                                 f"{len(candidates)} {'is' if len(candidates) == 1 else 'are'} visible",
                                 hint="lower --tensor-parallel-size/--pipeline-parallel-size")
            needed = len(candidates)
        owners = _owners(live)
        pending = _pending(snap, live, owners)
        ranked = sorted(candidates, key=lambda g: (-(_free(g, pending) or 0), g.index))
        chosen = sorted(ranked[:needed], key=lambda g: g.index)
    if not skip_checks:
        check_memory(snap, chosen, utilization, live)
    value, extra = gpu.cuda_visible_devices(chosen)
    placement = Placement(gpus=chosen, env={"CUDA_VISIBLE_DEVICES": value, **extra}, how=how)
    if how == "auto" and len(snap.gpus) > 1:
        placement.notes.append(f"placed on {placement.describe()} (most free memory); choose with --gpus")
    return placement


def apply(spec: Any, env: dict[str, str], added: dict[str, str], gpus_arg: str | None, skip_checks: bool,
          live: list[tuple[Any, Any]], cpu_engine: bool) -> Placement:
    """The one call `manager.start` makes: plan for `spec` and put CUDA_VISIBLE_DEVICES into the engine's
    environment (`env`, and `added`, the variables recorded)."""
    from sage_llm.engine.vllm import gpus_needed

    placement = plan(gpus_needed(spec), spec.gpu_memory_utilization, gpus_arg, skip_checks, live, cpu_engine,
                     environ=env)
    env.update(placement.env)
    added.update(placement.env)
    return placement
