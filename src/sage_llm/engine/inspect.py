"""`inspect`: every engine, managed and external, with its live state (probed in parallel, one pass over /proc)."""

from __future__ import annotations

import os
import time

from sage_llm.core.addresses import reachable_host
from sage_llm.core.state import CorruptRecord, EngineRecord, StateStore, api_key_for, parse_iso
from sage_llm.engine import process
from sage_llm.engine.discovery import discover_external
from sage_llm.engine.view import EngineView, apply_probe

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def _tree_procs(tree: process.Tree) -> list[dict[str, Any]]:
    out = []
    for p in tree.members:
        try:
            out.append({"pid": p.pid, "name": p.name()})
        except Exception:
            continue
    return out


# How the live state of cluster engines is attached to their views: None, engine/cluster.attach in this process
# (which imports Ray); the gateway sets its own (gateway/cluster_link.py: a separate process holds the Ray driver).
cluster_attach: Callable[[list[EngineView], StateStore], None] | None = None


def cluster_view(rec: EngineRecord) -> EngineView:
    """The view of an engine on a Ray cluster before its agent is asked (cluster.attach fills in its state)."""
    return EngineView(name=rec.name, managed=True, state="starting", model=rec.model,
                      served_model_name=rec.served_model_name, host=rec.host, port=rec.port, base_url=rec.base_url,
                      started_at=rec.started_at, log_file=rec.log_file, settings=rec.settings, record=rec)


def inspect(store: StateStore | None = None, include_external: bool = True, probe_timeout: float = 0.6,
            local_port: int | None = None) -> tuple[list[EngineView], list[str]]:
    """Every engine (managed records, then external vLLM servers) with its live state; plus warnings."""
    from sage_llm.observe import probe as probes

    store = store or StateStore()
    warnings: list[str] = []
    views: list[EngineView] = []
    pending: list[tuple[EngineView, EngineRecord, process.Tree]] = []
    records = store.all()
    table = process.proc_table()  # one pass over /proc shared by every record and by discovery
    for rec in records:
        if isinstance(rec, CorruptRecord) and rec.newer:
            error = f"written by a newer sage-llm ({rec.error}): upgrade sage-llm to see or stop this engine"
            warnings.append(f"engine record {rec.path} was {error}")
            views.append(EngineView(name=rec.name, managed=True, state="failed", error=error))
            continue
        if isinstance(rec, CorruptRecord):
            warnings.append(f"engine record {rec.path} is unreadable: {rec.error}")
            views.append(EngineView(name=rec.name, managed=True, state="failed", error=rec.error))
            continue
        if rec.cluster:
            # on a node of a Ray cluster: its state comes from its agent (engine/cluster.py), below
            views.append(cluster_view(rec))
            continue
        tree = process.find_tree(rec.pid, process.birth_of(rec), rec.id, table)
        view = EngineView(
            name=rec.name, managed=True, state="stopped", model=rec.model, served_model_name=rec.served_model_name,
            host=rec.host, port=rec.port, base_url=rec.base_url, pid=rec.pid, started_at=rec.started_at,
            log_file=rec.log_file, settings=rec.settings, record=rec, processes=_tree_procs(tree),
        )
        views.append(view)
        view.dtype = _view_dtype(rec)
        view.max_model_len = rec.max_model_len  # what it served when ready; a live /v1/models answer wins
        if tree.leader is not None:
            ts = parse_iso(rec.started_at)
            view.uptime_s = round(time.time() - ts, 1) if ts else None
            pending.append((view, rec, tree))
        elif tree.alive:
            view.state = "failed"
            pids = ", ".join(f"{p['name']} {p['pid']}" for p in view.processes)
            view.error = (f"API server (pid {rec.pid}) is gone but {len(tree.members)} engine process(es) are left "
                          f"({pids}); run `sage-llm stop {rec.name}` to clean them up")
        else:
            _explain_dead(view, rec, table)
    external: list[EngineView] = []
    if include_external:
        external = discover_external(records, local_port, table)
    targets = [(reachable_host(v.host), v.port, api_key_for(r)) for v, r, _ in pending]
    targets += [(reachable_host(v.host), v.port, None) for v in external if v.port]
    results = probes.probe_many(targets, timeout=probe_timeout)  # type: ignore[arg-type]
    for (view, rec, _tree), p in zip(pending, results[: len(pending)]):
        apply_probe(view, rec.served_model_name, p, rec.state)
        _attach_stage(view, rec)
        _note_owner(view, rec)
    ext_results = results[len(pending):]
    for view, p in zip([v for v in external if v.port], ext_results):
        apply_probe(view, view.served_model_name, p, "running")
        if view.state == "ready" and p.models and not view.served_model_name:
            view.served_model_name = p.model_ids[0]
    views.extend(v for v in external if v.state in ("ready", "starting", "unhealthy"))
    if any(v.record is not None and (v.record.settings or {}).get("ray_address") for v in views):
        from sage_llm.engine import ray_cluster

        ray_cluster.attach(views, store.root)
    if any(v.record is not None and v.record.cluster for v in views):
        if cluster_attach is not None:  # a long-lived caller asks its own Ray driver process
            cluster_attach(views, store)
        else:
            from sage_llm.engine import cluster  # Ray is imported only when cluster engines are recorded

            cluster.attach(views, store)
        for v in views:
            if v.cluster is not None and v.state == "ready":
                ts = parse_iso(v.started_at)
                v.uptime_s = round(time.time() - ts, 1) if ts else None
    return views, warnings



def _view_dtype(rec: EngineRecord) -> str | None:
    """The dtype the engine computes in: a concrete --dtype it was given is exactly that (no log read, status stays
    fast); for vLLM's auto, what its log says it resolved to, else "auto"."""
    from sage_llm.engine.vllm import concrete_dtype

    asked = rec.dtype or (rec.settings or {}).get("dtype")
    if concrete_dtype(asked):
        return concrete_dtype(asked)
    from sage_llm.observe.progress import engine_dtype  # only for vLLM's auto: the log says what it chose

    return (engine_dtype(rec.log_file) if rec.log_file else None) or asked

def _note_owner(view: EngineView, rec: EngineRecord) -> None:
    """An engine of `sage-llm run` whose `run` process is gone (SIGKILLed): still recorded, say how to stop it."""
    if not rec.foreground or not rec.owner_pid or view.error:
        return
    try:
        os.kill(rec.owner_pid, 0)
    except ProcessLookupError:
        view.error = (f"its `sage-llm run` (pid {rec.owner_pid}) is gone; the engine still runs: "
                      f"`sage-llm stop {rec.name}` stops it")
    except PermissionError:
        pass


def _attach_stage(view: EngineView, rec: EngineRecord) -> None:
    """`stage` and `progress` (0..1 of the current stage, or None) for a starting engine, from its log."""
    if view.state == "ready":
        view.stage, view.progress = "ready", 1.0
    elif view.state == "starting" and rec.log_file:
        from sage_llm.observe.progress import snapshot_of  # imported only while an engine loads: status stays lean

        snap = snapshot_of(rec.log_file, rec.model)
        if snap.stage == "ready":  # uvicorn said so but /health does not answer yet
            snap.stage, snap.progress = "starting_server", None
        view.stage, view.progress = snap.stage, snap.progress


def _explain_dead(view: EngineView, rec: EngineRecord, table: dict[int, process.ProcInfo] | None = None) -> None:
    reused = process.pid_reused_by(rec.pid, process.birth_of(rec), table)
    if rec.state == "failed":
        view.state = "failed"
        view.error = rec.error or "engine failed"
        return
    if rec.pid is None:
        view.state = "failed"
        view.error = "engine was never started (the CLI stopped before spawning it)"
        return
    from sage_llm.observe import logs as logtools  # only for an engine that died: why, from its log
    from sage_llm.observe.diagnose import diagnose, is_clean_shutdown

    lines = logtools.run_lines(rec.log_file)
    diag = diagnose(lines, {"port": rec.port, "model": rec.model, "name": rec.name})
    if diag is None and is_clean_shutdown(lines):
        view.state = "stopped"
        view.error = "engine shut down (not by `sage-llm stop`)"
    else:
        view.state = "failed"
        view.error = (f"engine exited unexpectedly: {diag.message} (hint: {diag.hint})" if diag and diag.hint
                      else f"engine exited unexpectedly: {diag.message}" if diag else "engine exited unexpectedly")
    if reused is not None:
        view.error += f" (pid {rec.pid} now belongs to another process, which is left alone)"
