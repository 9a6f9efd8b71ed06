"""The `status --json` document (schema_version 1). Built here so the fast path and the Typer path agree.

Contract: docs/status-json.md; JSON Schema: sage_llm/data/status.schema.json.
"""

from __future__ import annotations

from sage_llm.core.config import DEFAULT_PORT, EnvVars, env_str
from sage_llm.core.state import StateStore
from sage_llm.engine.inspect import inspect
from sage_llm.engine.view import EngineView, local_engine

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any


SCHEMA_VERSION = 1


def local_port() -> int:
    raw = env_str(EnvVars.LOCAL_PORT) or ""  # environment, else ./.env, else the config file (settings.py)
    return int(raw) if raw.isdigit() else DEFAULT_PORT


def _engine_pids(v: EngineView) -> set[int]:
    """Every process of an engine: its recorded tree, else (external engines) the PID and its descendants."""
    pids = {p["pid"] for p in v.processes if isinstance(p.get("pid"), int)}
    if v.pid:
        pids.add(v.pid)
        if not v.processes:
            import psutil

            try:
                pids.update(c.pid for c in psutil.Process(v.pid).children(recursive=True))
            except psutil.Error:
                pass
    return pids


def attach_gpu(views: list[EngineView], snap: Any = None) -> tuple[list[dict[str, Any]], str | None]:
    """Fill each engine's GPU memory, summed over its whole process tree (vLLM keeps the model in EngineCore and
    the workers, not in the PID we spawned), per GPU. Returns (top-level `gpus`, `gpu_error`).

    An engine's `gpus` lists the GPUs it holds memory on plus those it was placed on (`EngineRecord.gpus`), each as
    {index, uuid, memory_bytes}; memory_bytes is None where unknown (not measured yet, or the driver does not say).
    """
    from sage_llm.observe import gpu

    if snap is None:
        snap = gpu.snapshot(with_processes=True)
    by_pid: dict[int, list[Any]] = {}
    for p in snap.processes:
        by_pid.setdefault(p.pid, []).append(p)
    uuid_to_index = {g.uuid: g.index for g in snap.gpus if g.uuid}
    for v in views:
        per_gpu: dict[str, dict[str, Any]] = {}
        live = v.state in ("ready", "starting", "unhealthy") or bool(v.processes)
        # NVML works and lists GPUs: a live engine found on none of them holds 0 bytes (a CPU engine, or not loaded)
        total: int | None = 0 if live and snap.gpus and not snap.error else None
        if by_pid and live:
            for pid in sorted(_engine_pids(v)):
                for gp in by_pid.get(pid, []):
                    key = gp.gpu_uuid or f"index:{gp.gpu_index}"
                    entry = per_gpu.setdefault(key, {"index": gp.gpu_index, "uuid": gp.gpu_uuid, "memory_bytes": None})
                    if gp.used_memory_bytes is not None:
                        entry["memory_bytes"] = (entry["memory_bytes"] or 0) + gp.used_memory_bytes
                        total = (total or 0) + gp.used_memory_bytes
        for placed in (v.record.gpus if v.record is not None else []) or []:
            uuid = placed.get("uuid")
            key = uuid or f"index:{placed.get('index')}"
            if key not in per_gpu:
                index = uuid_to_index.get(uuid, placed.get("index")) if uuid else placed.get("index")
                per_gpu[key] = {"index": index, "uuid": uuid, "memory_bytes": None}
        v.gpu_memory_bytes = total
        v.gpus = sorted(per_gpu.values(), key=lambda e: (e["index"] is None, e["index"] or 0))
    return [g.to_json() for g in snap.gpus], snap.error


def build(target: str | None = None, store: StateStore | None = None, with_gpu: bool = True
          ) -> tuple[dict[str, Any], list[EngineView], list[str]]:
    port = local_port()
    warm = None
    if with_gpu:
        from sage_llm.observe import gpu

        if gpu.driver_present() and not gpu.initialised():  # NVML initialisation runs while engines are probed
            import threading  # only then: without a driver `status` starts no thread of its own

            warm = threading.Thread(target=gpu.error, daemon=True)
            warm.start()
    views, warnings = inspect(store, include_external=True, local_port=port)
    if warm is not None:
        warm.join()
    gpus, gpu_error = attach_gpu(views) if with_gpu else ([], None)
    local = local_engine(views, port)
    if target is not None:
        from sage_llm.engine.targets import select

        views = select(target, views)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "engines": [v.to_json() for v in views],
        "local_engine": local,
        "gpus": gpus,
        "gpu_error": gpu_error,
    }
    from sage_llm.engine.gateway_record import record_status  # reads gateway.json, never imports the HTTP stack

    gw = record_status()
    if gw is not None:
        doc["gateway"] = gw
    return doc, views, warnings
