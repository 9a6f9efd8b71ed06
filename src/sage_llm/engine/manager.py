"""Use cases: start, stop and inspect engines. Returns dataclasses; no printing, no Typer, no Rich."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_llm import audit
from sage_llm import logs as logtools
from sage_llm.config import DEFAULT_STOP_TIMEOUT, LOOPBACK_HOSTS
from sage_llm.diagnose import Diagnosis, diagnose, is_clean_shutdown
from sage_llm.engine import process
from sage_llm.errors import EngineFailed, EngineNotFound, PortInUse, SageLLMError, UsageError
from sage_llm.progress import LoadProgress, hub_download_size, snapshot_of
from sage_llm.state import CorruptRecord, EngineRecord, StateStore, validate_name

if TYPE_CHECKING:
    from sage_llm.engine.vllm import LaunchSpec

ProgressFn = Callable[[dict[str, Any]], None]


def utcnow_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def slug(model: str) -> str:
    last = model.rstrip("/").split("/")[-1] or "engine"
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-._").lower()
    return (s or "engine")[:55]


def api_key_for(record: EngineRecord) -> str | None:
    return os.environ.get(record.api_key_env) if record.api_key_env else None


# --------------------------------------------------------------------------------------------------------- start
@dataclass
class StartResult:
    record: EngineRecord
    already_running: bool = False
    port_note: str | None = None  # e.g. "port 8001 is busy; using 8002"
    ready_after_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    cached: bool | None = None


def _live(store: StateStore) -> list[tuple[EngineRecord, process.Tree]]:
    out = []
    for rec in store.all():
        if isinstance(rec, CorruptRecord):
            continue
        tree = process.find_tree(rec.pid, process.birth_of(rec), rec.id)
        if tree.alive:
            out.append((rec, tree))
    return out


def _choose_port(store: StateStore, host: str, port: int, explicit: bool,
                 live: list[tuple[EngineRecord, process.Tree]]) -> tuple[int, str | None]:
    claimed = {r.port for r, _ in live}
    if explicit:
        if port in claimed:
            other = next(r for r, _ in live if r.port == port)
            raise PortInUse(f"port {port} is used by engine {other.name!r} ({other.model})",
                            hint=f"stop it with `sage llm stop {other.name}` or choose another --port")
        if not process.port_is_free(host, port):
            pid, pname = process.port_owner(port)
            who = f" by {pname} (pid {pid})" if pid else ""
            raise PortInUse(f"port {port} is already in use{who}",
                            hint="choose another --port, or leave --port out to take the next free one")
        return port, None
    candidate = port
    for _ in range(200):
        if candidate <= 65535 and candidate not in claimed and process.port_is_free(host, candidate):
            note = None if candidate == port else f"port {port} is busy; using {candidate}"
            return candidate, note
        candidate += 1
    raise PortInUse(f"no free port found from {port} upwards", hint="pass a free --port")


@audit.audited(audit.start_command)
def start(
    spec: LaunchSpec,
    name: str | None = None,
    port_explicit: bool = False,
    wait: bool = True,
    timeout: float = 900.0,
    store: StateStore | None = None,
    on_progress: ProgressFn | None = None,
    foreground: bool = False,
    gpus: str | None = None,
    skip_checks: bool = False,
) -> StartResult:
    """Validate, spawn `vllm serve` detached, record it, and (with `wait`) wait until it serves the model.

    `gpus` ("0,1" or UUIDs) pins the GPUs; otherwise those with the most free memory are used. Their free memory is
    checked against --gpu-memory-utilization before spawning, unless `skip_checks` (engine/placement.py)."""
    import secrets

    from sage_llm.engine import envs, placement
    from sage_llm.engine.vllm import build_argv, build_env, validate

    store = store or StateStore()
    validate(spec)
    if name is not None:
        validate_name(name)
    if timeout <= 0:
        raise UsageError(f"--timeout {timeout:g} must be positive", hint="e.g. --timeout 900")
    cmd = envs.resolve_vllm(store.root)
    _check_scaleout(spec, cmd)
    warnings: list[str] = []
    if spec.host not in LOOPBACK_HOSTS and not spec.api_key_env:
        warnings.append(f"engine will listen on {spec.host} with no API key: anyone who can reach this machine can "
                        "use it (pass --api-key-env VAR)")
    served = spec.served_model_name or spec.model
    cached = _cache_state(spec.model)
    with contextlib.ExitStack() as locked:
        locked.enter_context(store.lock())
        live = _live(store)
        # idempotent: the same model already served (or starting) under this name / on this port
        for rec, _tree in live:
            if rec.state == "stopping" and (rec.name == name or (port_explicit and rec.port == spec.port)):
                raise SageLLMError(f"engine {rec.name!r} is being stopped right now",
                                   hint="run the start again once `sage llm stop` has finished")
            same_model = rec.model == spec.model and rec.served_model_name == served
            if not same_model or rec.state == "stopping":
                continue
            if (name is None or rec.name == name) and (not port_explicit or rec.port == spec.port):
                if not foreground:
                    locked.close()  # wait without the lock: a `stop` or another `start` must not queue behind a load
                    return _already(rec, store, wait, timeout, on_progress)
        chosen = name or slug(spec.model)
        existing = store.load(chosen)
        live_names = {r.name: r for r, _ in live}
        if chosen in live_names:
            if name is not None:
                other = live_names[chosen]
                raise UsageError(
                    f"engine {chosen!r} already runs {other.model} on port {other.port}",
                    hint=f"stop it first (`sage llm stop {chosen}`) or pick another --name",
                )
            base, n = chosen, 2
            while chosen in live_names or isinstance(store.load(chosen), CorruptRecord):
                chosen = f"{base}-{n}"
                n += 1
        elif isinstance(existing, CorruptRecord):
            if name is not None and existing.newer:
                raise existing.newer_error()
            if name is not None:
                raise UsageError(f"engine record {existing.path} is corrupt ({existing.error})",
                                 hint=f"inspect it, then remove it with `sage llm stop {chosen} --force`")
            base, n = chosen, 2
            while isinstance(store.load(chosen), CorruptRecord) or chosen in live_names:
                chosen = f"{base}-{n}"
                n += 1
        port, note = _choose_port(store, spec.host, spec.port, port_explicit, live)
        spec.port = port
        engine_id = secrets.token_hex(8)
        argv = build_argv(cmd.prefix, spec)
        cpu_engine = cmd.kind == "cpu" or (cmd.kind is None and _no_gpu())
        env, added = build_env(spec, engine_id, cpu_engine, offline_ok=cached is True)
        placed = placement.apply(spec, env, added, gpus, skip_checks, live, cpu_engine)
        if cmd.env_path:
            # the engine venv's bin first, so vLLM's helpers resolve inside its own environment
            env["PATH"] = str(Path(cmd.env_path) / "bin") + os.pathsep + env.get("PATH", "")
            env["VIRTUAL_ENV"] = cmd.env_path
        log_file = store.log_path(chosen)
        record = EngineRecord(
            name=chosen, model=spec.model, served_model_name=served, host=spec.host, port=port, id=engine_id,
            log_file=str(log_file), started_at=utcnow_iso(), state="launching", argv=argv,
            settings=spec.settings(), env=added, engine_env=cmd.env_path, api_key_env=spec.api_key_env,
            foreground=foreground, owner_pid=os.getpid() if foreground else None, gpus=placed.record(),
        )
        store.save(record)  # before spawning: a CLI killed from here on leaves a record to find the engine by
        _rotate_log(log_file)
        with open(log_file, "ab") as fh:
            fh.write(f"\n===== sage llm start {chosen} at {record.started_at}: {' '.join(argv)}\n".encode())
        try:
            spawned = process.spawn(argv, env, log_file)
        except OSError as exc:
            record.state = "failed"
            record.error = f"cannot run {argv[0]}: {exc.strerror}"
            store.save(record)
            raise EngineFailed(record.error, hint="run `sage llm engine install` to repair the engine") from exc
        record.pid = spawned.pid
        record.create_time = spawned.create_time
        record.start_ticks, record.boot_id = spawned.ticks, spawned.boot_id
        record.state = "running"
        store.save(record)
    result = StartResult(record, port_note=note, warnings=warnings, cached=cached)
    result._popen = spawned.popen  # type: ignore[attr-defined]
    if wait:
        result.ready_after_s = wait_ready(record, timeout, store, on_progress, popen=spawned.popen)
    return result


def _rotate_log(log_file: Path, max_bytes: int = 64 * 1024 * 1024) -> None:
    with contextlib.suppress(OSError):
        if log_file.stat().st_size > max_bytes:
            os.replace(log_file, log_file.with_suffix(".log.1"))


def _no_gpu() -> bool:
    from sage_llm import gpu

    return gpu.gpu_count() == 0


def _cache_state(model: str) -> bool | None:
    """True when `model` is a hub id complete in the local HF cache, False when absent, None when unknown/a path."""
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        return None
    try:
        from sage_llm import hf_cache

        return hf_cache.is_cached(model)
    except Exception:
        return None


def _already(rec: EngineRecord, store: StateStore, wait: bool, timeout: float, on_progress: ProgressFn | None
             ) -> StartResult:
    result = StartResult(rec, already_running=True)
    if wait:
        result.ready_after_s = wait_ready(rec, timeout, store, on_progress, kill_on_fail=False)
    return result


def wait_ready(
    record: EngineRecord,
    timeout: float,
    store: StateStore,
    on_progress: ProgressFn | None = None,
    popen: Any = None,
    kill_on_fail: bool = True,
    poll: float = 0.05,
) -> float:
    """Block until /health is 200 and /v1/models lists the served name; on death or timeout, clean up and raise."""
    from sage_llm import probe as probes

    started = time.monotonic()
    t0 = parse_iso(record.started_at) or time.time()
    key = api_key_for(record)
    last_emit = 0.0
    download_dir = (record.settings or {}).get("download_dir")
    loader = LoadProgress(record.log_file, model=record.model, size_lookup=hub_download_size,
                          hf_cache=Path(download_dir).expanduser() if download_dir else None) if on_progress else None

    def emit() -> None:
        assert on_progress is not None
        assert loader is not None
        snap = loader.poll()
        on_progress({"elapsed_s": time.time() - t0, "log_line": snap.last_line, "record": record,
                     "stage": snap.stage, "progress": snap.progress, "detail": snap.detail,
                     "stage_elapsed_s": snap.stage_elapsed(), "snapshot": snap})

    while True:
        now = time.monotonic()
        alive = popen.poll() is None if popen is not None else process.leader(record.pid, process.birth_of(record))
        if not alive:
            _fail(record, store, "exited during startup", kill=kill_on_fail)
        p = probes.probe(record.host if record.host not in ("", "0.0.0.0") else "127.0.0.1", record.port,
                         timeout=1.0, api_key=key)
        if p.health == 200 and (record.served_model_name in p.model_ids or p.models_status == 401):
            if loader is not None:
                loader.mark_ready()
                emit()
            return time.time() - t0
        if now - started > timeout:
            _fail(record, store, f"not ready after {timeout:g} s (--timeout)", kill=kill_on_fail)
        if on_progress and now - last_emit >= 0.25:
            last_emit = now
            emit()
        time.sleep(poll)


def _diag_context(record: EngineRecord, store: StateStore) -> dict[str, Any]:
    """What diagnosis needs besides the log: names, and which other engines are alive on the same GPUs (all of them
    when GPUs are unknown): they may hold the memory this one lacked."""
    mine = {str(g.get("uuid") or g.get("index")) for g in record.gpus or []}
    others = []
    for name in store.names():
        rec = store.load(name)
        if isinstance(rec, EngineRecord) and rec.id != record.id and process.leader(rec.pid, process.birth_of(rec)):
            theirs = {str(g.get("uuid") or g.get("index")) for g in rec.gpus or []}
            if not mine or not theirs or mine & theirs:
                others.append(name)
    return {"port": record.port, "model": record.model, "name": record.name, "other_engines": others,
            "cached": _cache_state(record.model)}


def _fail(record: EngineRecord, store: StateStore, what: str, kill: bool = True) -> None:
    lines = logtools.run_lines(record.log_file)  # read before stopping it: our SIGTERM is not the cause
    diag = diagnose(lines, _diag_context(record, store))
    if diag is None and "--timeout" in what:
        stage = snapshot_of(record.log_file, record.model)
        what += f" while {stage.label}" + (f" ({stage.detail})" if stage.detail else "")
    if kill:
        if not process.stop_tree(record.pid, process.birth_of(record), record.id, timeout=5.0).survivors:
            _leftovers(record)
    reason = f"engine {record.name!r} {what}" + (f": {diag.message}" if diag else "")
    hint = diag.hint if diag and diag.hint else f"see `sage llm logs {record.name} -n 80`"
    if kill:
        with store.lock():
            current = store.load(record.name)
            if isinstance(current, EngineRecord) and current.id == record.id:
                current.state = "failed"
                current.error = f"{reason} (hint: {hint})"
                store.save(current)
    err = EngineFailed(reason, hint=hint)
    err.log_tail = lines[-20:]  # type: ignore[attr-defined]
    err.diagnosis = diag  # type: ignore[attr-defined]
    raise err


# ---------------------------------------------------------------------------------------------------------- view
@dataclass
class EngineView:
    name: str | None
    managed: bool
    state: str  # starting | ready | unhealthy | failed | stopped
    model: str | None = None
    served_model_name: str | None = None
    host: str | None = None
    port: int | None = None
    base_url: str | None = None
    pid: int | None = None
    started_at: str | None = None
    uptime_s: float | None = None
    log_file: str | None = None
    error: str | None = None
    stage: str | None = None
    progress: float | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)
    gpu_memory_bytes: int | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    max_model_len: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    record: EngineRecord | None = None
    ray: dict[str, Any] | None = None  # engines on a Ray cluster: address, nodes, workers (engine/ray_cluster.py)

    def to_json(self) -> dict[str, Any]:
        keys = ("name", "managed", "state", "model", "served_model_name", "host", "port", "base_url", "pid",
                "started_at", "uptime_s", "log_file", "error", "stage", "progress", "gpu_memory_bytes", "gpus",
                "max_model_len", "processes")
        doc = {k: getattr(self, k) for k in keys}
        if self.ray is not None:
            doc["ray"] = self.ray
        return doc


def _tree_procs(tree: process.Tree) -> list[dict[str, Any]]:
    out = []
    for p in tree.members:
        try:
            out.append({"pid": p.pid, "name": p.name()})
        except Exception:
            continue
    return out


def inspect(store: StateStore | None = None, include_external: bool = True, probe_timeout: float = 0.6,
            local_port: int | None = None) -> tuple[list[EngineView], list[str]]:
    """Every engine (managed records, then external vLLM servers) with its live state; plus warnings."""
    from sage_llm import probe as probes

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
        tree = process.find_tree(rec.pid, process.birth_of(rec), rec.id, table)
        view = EngineView(
            name=rec.name, managed=True, state="stopped", model=rec.model, served_model_name=rec.served_model_name,
            host=rec.host, port=rec.port, base_url=rec.base_url, pid=rec.pid, started_at=rec.started_at,
            log_file=rec.log_file, settings=rec.settings, record=rec, processes=_tree_procs(tree),
        )
        views.append(view)
        if tree.leader is not None:
            ts = parse_iso(rec.started_at)
            view.uptime_s = round(time.time() - ts, 1) if ts else None
            pending.append((view, rec, tree))
        elif tree.alive:
            view.state = "failed"
            pids = ", ".join(f"{p['name']} {p['pid']}" for p in view.processes)
            view.error = (f"API server (pid {rec.pid}) is gone but {len(tree.members)} engine process(es) are left "
                          f"({pids}); run `sage llm stop {rec.name}` to clean them up")
        else:
            _explain_dead(view, rec, table)
    external: list[EngineView] = []
    if include_external:
        external = discover_external(records, local_port, table)
    targets = [(probes_host(v.host), v.port, api_key_for(r)) for v, r, _ in pending]
    targets += [(probes_host(v.host), v.port, None) for v in external if v.port]
    results = probes.probe_many(targets, timeout=probe_timeout)  # type: ignore[arg-type]
    for (view, rec, _tree), p in zip(pending, results[: len(pending)]):
        _apply_probe(view, rec.served_model_name, p, rec.state)
        _attach_stage(view, rec)
        _note_owner(view, rec)
    ext_results = results[len(pending):]
    for view, p in zip([v for v in external if v.port], ext_results):
        _apply_probe(view, view.served_model_name, p, "running")
        if view.state == "ready" and p.models and not view.served_model_name:
            view.served_model_name = p.model_ids[0]
    views.extend(v for v in external if v.state in ("ready", "starting", "unhealthy"))
    if any(v.record is not None and (v.record.settings or {}).get("ray_address") for v in views):
        from sage_llm.engine import ray_cluster

        ray_cluster.attach(views, store.root)
    return views, warnings


def _note_owner(view: EngineView, rec: EngineRecord) -> None:
    """An engine of `sage llm run` whose `run` process is gone (SIGKILLed): still recorded, say how to stop it."""
    if not rec.foreground or not rec.owner_pid or view.error:
        return
    try:
        os.kill(rec.owner_pid, 0)
    except ProcessLookupError:
        view.error = (f"its `sage llm run` (pid {rec.owner_pid}) is gone; the engine still runs: "
                      f"`sage llm stop {rec.name}` stops it")
    except PermissionError:
        pass


def _attach_stage(view: EngineView, rec: EngineRecord) -> None:
    """`stage` and `progress` (0..1 of the current stage, or None) for a starting engine, from its log."""
    if view.state == "ready":
        view.stage, view.progress = "ready", 1.0
    elif view.state == "starting" and rec.log_file:
        snap = snapshot_of(rec.log_file, rec.model)
        if snap.stage == "ready":  # uvicorn said so but /health does not answer yet
            snap.stage, snap.progress = "starting_server", None
        view.stage, view.progress = snap.stage, snap.progress


def probes_host(host: str | None) -> str:
    if not host or host in ("0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _apply_probe(view: EngineView, served: str | None, p: Any, recorded_state: str) -> None:
    if p.health == 200 and (served is None or served in p.model_ids or p.models_status == 401):
        view.state = "ready"
        for m in p.models:
            if m.get("id") == served and isinstance(m.get("max_model_len"), int):
                view.max_model_len = m["max_model_len"]
        if served is None and p.models:
            view.served_model_name = p.model_ids[0]
    elif p.refused:
        view.state = "starting"
    elif p.health == 200:
        view.state = "unhealthy"
        view.error = f"/v1/models does not list {served!r} (serves {', '.join(p.model_ids) or 'nothing'})"
    elif p.health is not None:
        view.state = "unhealthy"
        view.error = f"/health answered {p.health}" + (" (engine dead)" if p.health == 503 else "")
    else:
        view.state = "unhealthy"
        view.error = p.error or "no answer"


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
    lines = logtools.run_lines(rec.log_file)
    diag: Diagnosis | None = diagnose(lines, {"port": rec.port, "model": rec.model, "name": rec.name})
    if diag is None and is_clean_shutdown(lines):
        view.state = "stopped"
        view.error = "engine shut down (not by `sage llm stop`)"
    else:
        view.state = "failed"
        view.error = (f"engine exited unexpectedly: {diag.message} (hint: {diag.hint})" if diag and diag.hint
                      else f"engine exited unexpectedly: {diag.message}" if diag else "engine exited unexpectedly")
    if reused is not None:
        view.error += f" (pid {rec.pid} now belongs to another process, which is left alone)"


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
    info: dict[str, Any] = {"host": "0.0.0.0", "port": 8000, "model": None, "served": None}
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
        elif not a.startswith("-") and info["model"] is None and j == 0:
            info["model"] = a
            j += 1
        else:
            j += 1
    return info


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
    cand_pids = {p.pid for p, _ in candidates}
    for proc, info in candidates:
        if proc.ppid in cand_pids or info["port"] in found:
            continue
        started = proc.create_time
        found[info["port"]] = EngineView(
            name=None, managed=False, state="stopped", model=info["model"], served_model_name=info["served"],
            host=info["host"], port=info["port"], base_url=f"http://{probes_host(info['host'])}:{info['port']}/v1",
            pid=proc.pid, started_at=datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds")
            .replace("+00:00", "Z") if started else None,
            uptime_s=round(time.time() - started, 1) if started else None,
        )
    if local_port and local_port not in found and local_port not in managed_ports:
        from sage_llm import probe as probes

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


# ---------------------------------------------------------------------------------------------------------- stop
@dataclass
class StopOutcome:
    name: str
    stopped: bool  # nothing of it is left running
    already_gone: bool = False
    escalated: bool = False
    survivors: list[tuple[int, str]] = field(default_factory=list)
    duration_s: float = 0.0
    port_free: bool = True
    message: str = ""
    shm_removed: list[str] = field(default_factory=list)  # vLLM's /dev/shm leftovers swept after the stop
    notes: list[str] = field(default_factory=list)  # e.g. Ray workers still alive


def resolve_targets(targets: list[str], all_: bool, store: StateStore) -> list[str]:
    """Engine names for NAME|PORT arguments (or every engine with --all)."""
    names = store.names()
    if all_:
        if targets:
            raise UsageError("give engine names or --all, not both", hint="e.g. `sage llm stop --all`")
        return names
    if not targets:
        if len(names) == 1:
            return names
        if not names:
            return []
        raise UsageError(f"{len(names)} engines are recorded; say which: {', '.join(names)}",
                         hint="e.g. `sage llm stop NAME`, or `sage llm stop --all`")
    out: list[str] = []
    for t in targets:
        out.append(resolve_one(t, store))
    return list(dict.fromkeys(out))


def resolve_one(target: str, store: StateStore) -> str:
    names = store.names()
    if target in names:
        return target
    if target.isdigit():
        port = int(target)
        for n in names:
            rec = store.load(n)
            if isinstance(rec, EngineRecord) and rec.port == port:
                return n
        views = discover_external([r for r in (store.load(n) for n in names) if r is not None], port)
        for v in views:
            if v.port == port:
                raise UsageError(
                    f"the engine on port {port} (pid {v.pid}) was not started by sage llm; not touching it",
                    hint="stop it where it was started (Ctrl-C in its terminal)",
                )
        raise EngineNotFound(f"no engine on port {port}", hint="see `sage llm status`")
    if "/" in target or not re.match(r"^[A-Za-z0-9._-]+$", target):
        raise UsageError(f"invalid engine name {target!r}", hint="engine names have no '/' or spaces; "
                         "see `sage llm status -q`")
    known = ", ".join(names) if names else "none"
    raise EngineNotFound(f"no engine named {target!r} (engines: {known})", hint="see `sage llm status`")


def _mark(store: StateStore, rec: EngineRecord, state: str) -> None:
    with store.lock():
        current = store.load(rec.name)
        if isinstance(current, EngineRecord) and current.id == rec.id and current.state != "failed":
            current.state = state
            store.save(current)


@audit.audited("stop")
def stop(name: str, timeout: float = DEFAULT_STOP_TIMEOUT, force: bool = False, store: StateStore | None = None,
         on_escalate: Callable[[str], None] | None = None) -> StopOutcome:
    """Stop one engine's whole tree; remove its record only once nothing of it is left and its port is free."""
    store = store or StateStore()
    if timeout < 0:
        raise UsageError(f"--timeout {timeout:g} must not be negative", hint="e.g. --timeout 30")
    rec = store.load(name)
    if rec is None:
        return StopOutcome(name, stopped=True, already_gone=True, message=f"engine {name!r} is not running")
    if isinstance(rec, CorruptRecord):
        if rec.newer:
            raise rec.newer_error()  # exit 2; nothing signalled, nothing removed, --force or not
        if force:
            with store.lock():
                store.remove(name)
            return StopOutcome(name, stopped=True, already_gone=True,
                               message=f"removed corrupt record {rec.path} ({rec.error})")
        raise SageLLMError(f"engine record {rec.path} is corrupt ({rec.error}); nothing was signalled",
                           hint=f"check no engine of it runs, then `sage llm stop {name} --force` removes the record")
    tree = process.find_tree(rec.pid, process.birth_of(rec), rec.id)
    gone_before = not tree.alive
    if not gone_before:
        _mark(store, rec, "stopping")  # a racing `start` of the same name answers "being stopped", not "running"
    result = process.stop_tree(rec.pid, process.birth_of(rec), rec.id, timeout=timeout, force=force,
                               on_escalate=(lambda: on_escalate(name)) if on_escalate else None)
    port_free = True
    if not result.survivors:
        deadline = time.monotonic() + 2.0
        while not (port_free := process.port_is_free(rec.host, rec.port)) and time.monotonic() < deadline:
            time.sleep(0.05)
    outcome = StopOutcome(name, stopped=not result.survivors, already_gone=gone_before, escalated=result.escalated,
                          survivors=result.survivors, duration_s=result.duration_s, port_free=port_free)
    if result.survivors:
        _mark(store, rec, "running")
        left = ", ".join(f"{n} (pid {p})" for p, n in result.survivors)
        outcome.message = f"engine {name!r}: still running after SIGKILL: {left}"
        return outcome
    outcome.shm_removed, outcome.notes = _leftovers(rec, {p.pid for p in tree.members})
    with store.lock():
        current = store.load(name)
        if isinstance(current, EngineRecord) and current.id == rec.id:
            store.remove(name)
    if gone_before:
        outcome.message = f"engine {name!r} was not running; record removed"
    else:
        how = " (SIGKILL after the grace period)" if result.escalated else (" (forced)" if force else "")
        outcome.message = f"stopped {name!r}{how} in {result.duration_s:.2f} s"
    if not port_free:
        pid, pname = process.port_owner(rec.port)
        outcome.message += f"; port {rec.port} is held by another process ({pname or '?'} pid {pid or '?'})"
    return outcome


# ---------------------------------------------------------------------------------------------------------- json
def human_uptime(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def local_engine(views: list[EngineView], local_port: int) -> dict[str, Any]:
    """The seed's LocalEngineStatus: the ready engine Studio should use."""
    ready = [v for v in views if v.state == "ready"]
    pick = next((v for v in ready if v.port == local_port), None) or (ready[0] if ready else None)
    if pick is None:
        return {"running": False, "port": None, "model": None, "pid": None, "gpu_memory_usage": None, "uptime": None}
    gb = round(pick.gpu_memory_bytes / 1024**3, 2) if pick.gpu_memory_bytes is not None else None
    return {"running": True, "port": pick.port, "model": pick.served_model_name or pick.model, "pid": pick.pid,
            "gpu_memory_usage": gb, "uptime": human_uptime(pick.uptime_s)}


# ----------------------------------------------------------------------------------------------------- scale-out
def _check_scaleout(spec: LaunchSpec, cmd: Any) -> None:
    """Before spawning: Ray must be in the engine environment (the GPU count is checked by placement.py)."""
    if not (spec.ray_address and cmd.env_path):
        return
    if not any(Path(cmd.env_path).glob("lib/python*/site-packages/ray/__init__.py")):
        raise UsageError(f"--ray-address needs Ray in the engine environment {cmd.env_path}, and it has none",
                         hint="run `sage llm engine install --ray` (it adds a pinned Ray)")


def _leftovers(rec: EngineRecord, pids: set[int] | None = None) -> tuple[list[str], list[str]]:
    """Once no process of the engine is left: sweep its /dev/shm leftovers; with Ray, check its workers are gone.

    Returns (shared-memory files removed, notes about Ray workers still alive). The Ray cluster is left running."""
    removed = process.sweep_shm(rec.create_time or parse_iso(rec.started_at), rec.port)
    notes: list[str] = []
    address = (rec.settings or {}).get("ray_address")
    if address:
        from sage_llm.engine import ray_cluster

        left = ray_cluster.wait_workers_gone(rec, address, pids=pids)
        if left:
            notes.append(f"{len(left)} Ray worker(s) of {rec.name!r} still alive on the cluster: " + ", ".join(left)
                         + " (the cluster itself was left running)")
    return removed, notes
