"""What a Ray cluster can tell about an engine's workers: best effort, bounded in time, never changing the cluster.

The CLI's own environment has no Ray; the engine environment that runs vLLM with `--ray-address` has it. So the
cluster is read by a short script run with the engine environment's Python, straight from the GCS (no `ray.init`,
no job is created, no dashboard needed), with a hard timeout. Any failure gives an `error` string, never an exception.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from sage_llm.core.state import EngineRecord

QUERY_TIMEOUT_S = 6.0

# Runs in the engine environment. Prints one JSON document: nodes, jobs and actors, as the GCS has them.
_SCRIPT = r"""
import json, sys
from ray._private.state import GlobalState
from ray._raylet import GcsClientOptions
gs = GlobalState()
gs._initialize_global_state(GcsClientOptions.create(sys.argv[1], None, allow_cluster_id_nil=True,
                                                    fetch_cluster_id_if_nil=False))
nodes = [{"node_id": n.get("NodeID"), "address": n.get("NodeManagerAddress"), "hostname": n.get("NodeManagerHostname"),
          "alive": bool(n.get("Alive")), "gpus": (n.get("Resources") or {}).get("GPU", 0),
          "cpus": (n.get("Resources") or {}).get("CPU", 0)} for n in gs.node_table()]
jobs = [{"job_id": j.get("JobID"), "driver_pid": j.get("DriverPid"), "driver_ip": j.get("DriverIPAddress"),
         "dead": bool(j.get("IsDead")), "start_ms": j.get("StartTime"), "entrypoint": j.get("Entrypoint", "")}
        for j in gs.job_table()]
actors = [{"actor_id": a.get("ActorID"), "class_name": a.get("ActorClassName"), "job_id": a.get("JobID"),
           "state": a.get("State"), "pid": a.get("Pid"), "node_id": (a.get("Address") or {}).get("NodeID"),
           "ip": (a.get("Address") or {}).get("IPAddress")} for a in (gs.actor_table(None) or {}).values()]
print(json.dumps({"nodes": nodes, "jobs": jobs, "actors": actors}))
"""


def engine_python(rec: EngineRecord) -> str | None:
    """The Python of the environment the engine ran in (where Ray is installed)."""
    candidates = []
    if rec.engine_env:
        candidates.append(Path(rec.engine_env) / "bin" / "python")
    if rec.argv:
        candidates.append(Path(rec.argv[0]).parent / "python")
    for c in candidates:
        if c.exists():
            return str(c)
    return None


def client_env(address: str) -> dict[str, str]:
    from sage_llm.engine.vllm import ray_address_is_loopback

    env = dict(os.environ)
    env["RAY_ADDRESS"] = address
    if ray_address_is_loopback(address):
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return env


def query(address: str, python: str | None, timeout: float = QUERY_TIMEOUT_S) -> dict[str, Any]:
    """{"nodes": [...], "jobs": [...], "actors": [...]} from the cluster's GCS, or {"error": "..."}."""
    if not python:
        return {"error": "no engine environment with Ray to ask the cluster from"}
    gcs = address.removeprefix("ray://")
    if address == "auto" or address.startswith("ray://"):
        return {"error": f"cannot read the cluster's state from {address!r} (give the GCS HOST:PORT)"}
    try:
        out = subprocess.run([python, "-c", _SCRIPT, gcs], capture_output=True, text=True, timeout=timeout,
                             env=client_env(address), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"the Ray cluster at {address} did not answer within {timeout:g} s"}
    except OSError as exc:
        return {"error": f"cannot run {python}: {exc.strerror}"}
    if out.returncode != 0:
        last = [ln for ln in out.stderr.splitlines() if ln.strip()]
        return {"error": f"cannot read the Ray cluster at {address}: " + (last[-1][-200:] if last else "no output")}
    try:
        data = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "the Ray query printed no JSON"}
    return data if isinstance(data, dict) else {"error": "the Ray query printed no JSON object"}


def _local_addresses() -> set[str]:
    import psutil

    found = {"127.0.0.1", "::1"}
    try:
        for addrs in psutil.net_if_addrs().values():
            found.update(a.address.split("%")[0] for a in addrs)
    except (OSError, psutil.Error):
        pass
    return found


def _gone(pid: int | None, since_ms: float) -> bool:
    """The process `pid` no longer runs (or the pid now belongs to a process started after `since_ms`)."""
    import psutil

    if not pid:
        return True
    try:
        return psutil.Process(pid).create_time() * 1000 > since_ms + 1000
    except psutil.Error:
        return True


def engine_jobs(data: dict[str, Any], rec: EngineRecord, pids: set[int] | None = None) -> set[str]:
    """Ray jobs whose driver is (or was) a process of this engine.

    While the engine lives: by driver pid (`pids`, the engine's processes; vLLM's driver is its EngineCore). After it
    is gone: jobs started on this machine during its lifetime whose driver process is gone too (a live driver is
    another program's)."""
    since_ms = ((rec.create_time or 0.0) - 1.0) * 1000
    local = None
    found = set()
    for job in data.get("jobs", []):
        driver = job.get("driver_pid")
        started = job.get("start_ms") or 0
        if (pids and driver in pids) or (driver == rec.pid and started >= since_ms):
            found.add(job["job_id"])
            continue
        if started < since_ms:
            continue
        if local is None:
            local = _local_addresses()
        if job.get("driver_ip") in local and _gone(driver, started):
            found.add(job["job_id"])
    return found


def wait_workers_gone(rec: EngineRecord, address: str, timeout: float = 10.0, pids: set[int] | None = None
                      ) -> list[str]:
    """After a stop: wait until the engine's Ray actors are dead; describe those still alive ([] when all gone, or
    when the cluster cannot tell). The cluster is never stopped or changed."""
    python = engine_python(rec)
    deadline = time.monotonic() + timeout
    left: list[str] = []
    while True:
        data = query(address, python, timeout=max(1.0, min(QUERY_TIMEOUT_S, deadline - time.monotonic())))
        if "error" in data:
            return []
        jobs = engine_jobs(data, rec, pids)
        left = [f"{a.get('class_name')} pid {a.get('pid')} on {a.get('ip')}" for a in data.get("actors", [])
                if a.get("job_id") in jobs and a.get("state") not in ("DEAD",)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------------- status
CACHE_TTL_S = 10.0


def _cached_query(address: str, python: str | None, cache_path: Path) -> dict[str, Any]:
    """query() at most once per CACHE_TTL_S per address (status is polled)."""
    from sage_llm.core.state import atomic_write_json

    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(address) if isinstance(cache, dict) else None
    if isinstance(hit, dict) and time.time() - float(hit.get("t", 0)) < CACHE_TTL_S:
        return hit.get("data") or {}
    data = query(address, python, timeout=4.0)
    cache = {k: v for k, v in (cache.items() if isinstance(cache, dict) else [])
             if isinstance(v, dict) and time.time() - float(v.get("t", 0)) < CACHE_TTL_S}
    cache[address] = {"t": time.time(), "data": data}
    try:
        atomic_write_json(cache_path, cache)
    except Exception:
        pass
    return data


def attach(views: list[Any], root: Path) -> None:
    """Give every engine started with --ray-address a `ray` entry: the address, and (live engines, when the cluster
    answers within a few seconds) its nodes and the workers of this engine with their node and GPUs."""
    for view in views:
        rec = getattr(view, "record", None)
        address = (rec.settings or {}).get("ray_address") if rec is not None else None
        if not address:
            continue
        info: dict[str, Any] = {"address": address, "nodes": [], "workers": [], "error": None}
        if view.state in ("starting", "ready", "unhealthy"):
            data = _cached_query(address, engine_python(rec), root / "ray-status-cache.json")
            if "error" in data:
                info["error"] = data["error"]
            else:
                pids = {p["pid"] for p in view.processes} | ({view.pid} if view.pid else set())
                nodes = {n["node_id"]: n for n in data.get("nodes", [])}
                info["nodes"] = [{"address": n["address"], "alive": n["alive"], "gpus": n["gpus"]}
                                 for n in nodes.values()]
                jobs = engine_jobs(data, rec, pids)
                for a in data.get("actors", []):
                    if a.get("job_id") in jobs and a.get("state") != "DEAD":
                        node = nodes.get(a.get("node_id"), {})
                        info["workers"].append({"class_name": a.get("class_name"), "pid": a.get("pid"),
                                                "state": a.get("state"), "node": a.get("ip") or node.get("address"),
                                                "node_gpus": node.get("gpus")})
        view.ray = info


def describe(info: dict[str, Any]) -> str:
    """One line for the human status view."""
    text = f"Ray cluster {info['address']}"
    if info.get("error"):
        return text + f" ({info['error']})"
    nodes = [n for n in info.get("nodes", []) if n.get("alive")]
    if nodes:
        gpus = sum(float(n.get("gpus") or 0) for n in nodes)
        text += f": {len(nodes)} node(s), {gpus:g} GPU(s)"
    workers = info.get("workers", [])
    if workers:
        per: dict[str, int] = {}
        for w in workers:
            per[str(w.get("node"))] = per.get(str(w.get("node")), 0) + 1
        text += "; workers: " + ", ".join(f"{n} on {node}" for node, n in per.items())
    return text
