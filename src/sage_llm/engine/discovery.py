"""vLLM servers this tool did not start: found by command line in /proc, and on the local engine port."""

from __future__ import annotations

import os
import re
import time

from sage_llm.core.addresses import url_host
from sage_llm.core.state import CorruptRecord, EngineRecord
from sage_llm.engine import process
from sage_llm.engine.view import EngineView

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any

VLLM_CMD = re.compile(r"vllm", re.IGNORECASE)


def _vllm_cmdline(cmdline: list[str]) -> dict[str, Any] | None:
    """Parse `... vllm serve MODEL --port P` or `python -m vllm.entrypoints...`; None if not a vLLM server."""
    is_server = False
    start = 0
    for i, arg in enumerate(cmdline):
        base = os.path.basename(arg)
        if VLLM_CMD.search(base) and i + 1 < len(cmdline) and cmdline[i + 1] == "serve":
            is_server, start = True, i + 2
            break
        if arg.startswith("vllm.entrypoints") and ("api_server" in arg or "cli" in arg or "entry" in arg):
            is_server, start = True, i + 1
            if arg.endswith("cli.main") and i + 1 < len(cmdline) and cmdline[i + 1] == "serve":
                start = i + 2
            break
    if not is_server:
        return None
    info: dict[str, Any] = {"host": "0.0.0.0", "port": 8000, "model": None, "served": None, "dtype": None}
    rest = cmdline[start:]
    j = 0
    while j < len(rest):
        a = rest[j]
        key, _, val = a.partition("=")
        take = val if "=" in a else (rest[j + 1] if j + 1 < len(rest) else None)
        step = 1 if "=" in a else 2
        if key == "--port" and take and take.isdigit():
            info["port"] = int(take)
            j += step
        elif key == "--host" and take is not None:
            info["host"] = take or "0.0.0.0"
            j += step
        elif key == "--model" and take:
            info["model"] = take
            j += step
        elif key == "--served-model-name" and take:
            info["served"] = take
            j += step
        elif key == "--dtype" and take:
            info["dtype"] = take
            j += step
        elif not a.startswith("-") and info["model"] is None and j == 0:
            info["model"] = a
            j += 1
        else:
            j += 1
    return info


def _engine_id(proc: process.ProcInfo) -> str | None:
    try:
        return process.Proc.of(proc).environ().get("SAGE_LLM_ENGINE_ID")
    except (PermissionError, ProcessLookupError):
        return None


def discover_external(records: list[EngineRecord | CorruptRecord], local_port: int | None = None,
                      table: dict[int, process.ProcInfo] | None = None) -> list[EngineView]:
    """vLLM servers this tool did not start: by command line, and on SAGE_LOCAL_ENGINE_PORT by /v1/models."""
    managed_pids = {r.pid for r in records if isinstance(r, EngineRecord) and r.pid}
    managed_ports = {r.port for r in records if isinstance(r, EngineRecord)}
    found: dict[int, EngineView] = {}
    candidates = []
    if table is None:
        table = process.proc_table()
    for proc in table.values():
        if proc.state in ("Z", "X") or proc.pid in managed_pids or proc.sid in managed_pids:
            continue
        cmd = proc.cmdline()
        if not cmd or not any("vllm" in c.lower() for c in cmd):
            continue
        info = _vllm_cmdline(cmd)
        if info is not None:
            candidates.append((proc, info))
    # an engine of ours placed on a Ray cluster whose node is this machine: its record holds the node's pid, not
    # this machine's view of it; it is known by the engine id in its environment
    placed = {r.id for r in records if isinstance(r, EngineRecord) and r.cluster}
    if placed:
        candidates = [(p, i) for p, i in candidates if _engine_id(p) not in placed]
    cand_pids = {p.pid for p, _ in candidates}
    for proc, info in candidates:
        if proc.ppid in cand_pids or info["port"] in found:
            continue
        started = proc.create_time
        found[info["port"]] = EngineView(
            name=None, managed=False, state="stopped", model=info["model"], served_model_name=info["served"],
            host=info["host"], port=info["port"], base_url=f"http://{url_host(info['host'])}:{info['port']}/v1",
            pid=proc.pid, started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)) if started else None,
            uptime_s=round(time.time() - started, 1) if started else None, dtype=info["dtype"] or "auto",
        )
    if local_port and local_port not in found and local_port not in managed_ports:
        from sage_llm.observe import probe as probes

        p = probes.probe("127.0.0.1", local_port, timeout=0.5)
        if p.health == 200 and p.owned_by_vllm:
            pid, _ = process.port_owner(local_port)
            found[local_port] = EngineView(
                name=None, managed=False, state="stopped", model=(p.models[0].get("root") or p.model_ids[0]),
                served_model_name=p.model_ids[0], host="127.0.0.1", port=local_port,
                base_url=f"http://127.0.0.1:{local_port}/v1", pid=pid,
            )
    children: dict[int, list[process.ProcInfo]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info)
    for view in found.values():
        view.name = f"external-{view.port}"
        if view.pid and view.pid in table and not view.processes:
            # the server and its descendants (EngineCore, workers): for GPU memory per engine, without psutil
            todo, seen = [table[view.pid]], []
            while todo:
                cur = todo.pop()
                if cur.state not in ("Z", "X"):
                    seen.append({"pid": cur.pid, "name": cur.name})
                todo.extend(children.get(cur.pid, []))
            view.processes = seen
    return list(found.values())
