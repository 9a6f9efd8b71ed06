"""The `status --json` document (schema_version 1). Built here so the fast path and the Typer path agree.

Contract: docs/status-json.md; JSON Schema: sage_llm/data/status.schema.json.
"""

from __future__ import annotations

import os
from typing import Any

from sage_llm.config import DEFAULT_PORT, EnvVars
from sage_llm.engine.manager import EngineView, inspect, local_engine
from sage_llm.state import StateStore

SCHEMA_VERSION = 1


def local_port() -> int:
    raw = os.environ.get(EnvVars.LOCAL_PORT, "")
    return int(raw) if raw.strip().isdigit() else DEFAULT_PORT


def attach_gpu(views: list[EngineView]) -> tuple[list[dict[str, Any]], str | None]:
    """Fill each engine's GPU memory (summed over its whole process tree) and return (gpus, gpu_error)."""
    from sage_llm import gpu

    snap = gpu.snapshot(with_processes=True)
    if snap.error:
        return [], snap.error
    by_pid: dict[int, list[Any]] = {}
    for p in snap.processes:
        by_pid.setdefault(p.pid, []).append(p)
    for v in views:
        pids = {p["pid"] for p in v.processes} | ({v.pid} if v.pid else set())
        total, seen, per_gpu = 0, False, {}
        for pid in pids:
            for gp in by_pid.get(pid, []):
                seen = True
                total += gp.used_memory_bytes or 0
                per_gpu.setdefault(gp.gpu_index, {"index": gp.gpu_index, "uuid": gp.gpu_uuid, "memory_bytes": 0})
                per_gpu[gp.gpu_index]["memory_bytes"] += gp.used_memory_bytes or 0
        if seen:
            v.gpu_memory_bytes = total
            v.gpus = [per_gpu[k] for k in sorted(per_gpu)]
    return [g.to_json() for g in snap.gpus], None


def build(target: str | None = None, store: StateStore | None = None, with_gpu: bool = True
          ) -> tuple[dict[str, Any], list[EngineView], list[str]]:
    port = local_port()
    views, warnings = inspect(store, include_external=True, local_port=port)
    gpus, gpu_error = attach_gpu(views) if with_gpu else ([], None)
    local = local_engine(views, port)
    if target is not None:
        views = [v for v in views if v.name == target or (target.isdigit() and v.port == int(target))]
    doc = {
        "schema_version": SCHEMA_VERSION,
        "engines": [v.to_json() for v in views],
        "local_engine": local,
        "gpus": gpus,
        "gpu_error": gpu_error,
    }
    return doc, views, warnings
