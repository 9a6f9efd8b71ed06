"""A process that holds the Ray driver for a long-lived caller (the gateway): `-m sage_llm.engine.cluster_worker`.

Ray's driver is not something a server should carry in its own process. When the cluster's head (GCS) is gone for
a minute, Ray ends the driver's process ("Failed to connect to GCS within 60 seconds ... The program will
terminate"); calls to the GCS block while it is away; and the driver installs signal handlers of its own. So the
gateway never imports Ray: it sends each cluster operation to this process, one JSON line per request on stdin,
and reads one JSON line per answer (and per progress report) on stdout. Each request runs in a thread of its own,
so a long start does not hold up a status. When this process ends (Ray ended it, or it was killed), the caller fails
the requests in flight and starts a new one for the next request (gateway/cluster_link.py).

Requests: {"id": N, "op": OP, "args": {...}}. Answers: {"id": N, "result": ...}, {"id": N, "error": {"type",
"message", "hint", "nodes"}}, or {"id": N, "progress": {...}} (only for "start"). The operations are those of
engine/cluster.py, on records of the state directory this process shares with its caller (SAGE_LLM_HOME).
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

PROGRESS_KEYS = ("stage", "progress", "detail", "elapsed_s", "log_line", "stage_elapsed_s")


def _view_fields(v: Any) -> dict[str, Any]:
    return {"state": v.state, "stage": v.stage, "progress": v.progress, "error": v.error, "pid": v.pid,
            "host": v.host, "port": v.port, "base_url": v.base_url, "cluster": v.cluster}


def op_join(address: str) -> None:
    from sage_llm.engine import cluster

    cluster.connect(address)


def op_start(spec: dict[str, Any], address: str, emit: Any, **kw: Any) -> str:
    """cluster.start; returns the engine's record name (the caller reads the record)."""
    from sage_llm.engine import cluster
    from sage_llm.engine.vllm import LaunchSpec

    def progress(info: dict[str, Any]) -> None:
        emit({k: info.get(k) for k in PROGRESS_KEYS})

    kw["avoid"] = set(kw.get("avoid") or ())
    result = cluster.start(LaunchSpec(**spec), address, wait=True, on_progress=progress, **kw)
    return str(result.record.name)


def op_stop(name: str, grace: float, force: bool = False) -> dict[str, Any]:
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import cluster

    store = StateStore()
    rec = store.load(name)
    if not isinstance(rec, EngineRecord) or not rec.cluster:
        return {"stopped": True, "message": f"engine {name!r} was not running; nothing recorded"}
    outcome = cluster.stop(rec, grace, force, store)
    return {"stopped": outcome.stopped, "message": outcome.message}


def op_views(names: list[str]) -> dict[str, dict[str, Any]]:
    """The live state of the named cluster engines, as `status` computes it (their agents, through Ray)."""
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import cluster
    from sage_llm.engine.inspect import cluster_view

    store = StateStore()
    views = [cluster_view(r) for n in names if isinstance(r := store.load(n), EngineRecord) and r.cluster]
    cluster.attach(views, store)
    return {str(v.name): _view_fields(v) for v in views}


def op_liveness(name: str) -> str:
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import cluster

    rec = StateStore().load(name)
    if not isinstance(rec, EngineRecord) or not rec.cluster:
        return "gone"
    return cluster.liveness(rec)


def op_abandon(name: str) -> None:
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import cluster

    store = StateStore()
    rec = store.load(name)
    if isinstance(rec, EngineRecord) and rec.cluster:
        cluster.abandon_record(rec, store)


OPS = {"join": op_join, "start": op_start, "stop": op_stop, "views": op_views, "liveness": op_liveness,
       "abandon": op_abandon}


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": getattr(exc, "message", None) or str(exc) or type(exc).__name__,
            "hint": getattr(exc, "hint", None), "nodes": list(getattr(exc, "nodes", None) or [])}


def main() -> int:
    out = sys.stdout
    sys.stdout = sys.stderr  # whatever Ray or a library prints goes to the caller's log, never into the answers
    lock = threading.Lock()

    def send(doc: dict[str, Any]) -> None:
        line = json.dumps(doc, default=str)
        with lock:
            out.write(line + "\n")
            out.flush()

    def serve(req: dict[str, Any]) -> None:
        rid = req.get("id")
        try:
            fn = OPS[str(req.get("op"))]
            args = dict(req.get("args") or {})
            if fn is op_start:
                args["emit"] = lambda info: send({"id": rid, "progress": info})
            send({"id": rid, "result": fn(**args)})
        except BaseException as exc:  # every failure goes back to the caller as an answer
            send({"id": rid, "error": _error(exc)})

    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            continue
        if isinstance(req, dict):
            threading.Thread(target=serve, args=(req,), daemon=True, name=f"op-{req.get('op')}").start()
    return 0  # the caller closed our stdin: it is gone or done with us


if __name__ == "__main__":
    sys.exit(main())
