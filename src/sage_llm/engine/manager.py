"""Lifecycle: start (spawn, wait, fail with a diagnosis) and stop engines. Dataclasses out; no printing.

Inspecting lives in engine/inspect.py, discovery of engines we did not start in engine/discovery.py, NAME|PORT
resolution in engine/targets.py; the public entry point for all of it is sage_llm.api."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_llm.core import audit
from sage_llm.core.addresses import is_loopback, reachable_host
from sage_llm.core.config import DEFAULT_STOP_TIMEOUT
from sage_llm.core.errors import EngineFailed, PortInUse, SageLLMError, UsageError
from sage_llm.core.state import (
    CorruptRecord,
    EngineRecord,
    StateStore,
    api_key_for,
    parse_iso,
    utcnow_iso,
    validate_name,
)
from sage_llm.engine import portlocks, process
from sage_llm.engine.targets import slug
from sage_llm.observe import logs as logtools
from sage_llm.observe.diagnose import diagnose
from sage_llm.observe.progress import LoadProgress, engine_dtype, snapshot_of

if TYPE_CHECKING:
    from sage_llm.engine.vllm import LaunchSpec
    from sage_llm.models.hf_cache import Preflight

ProgressFn = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------------------------------------- start
@dataclass
class StartResult:
    record: EngineRecord
    already_running: bool = False
    port_note: str | None = None  # e.g. "port 8001 is busy; using 8002"
    ready_after_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    cached: bool | None = None
    preflight: Preflight | None = None  # what the model check before the start found (sage_llm.api.start)
    dtype_note: str | None = None  # "dtype: float32 (CPU default; --dtype to change)"
    context_note: str | None = None  # "context: 2048 tokens (...)": the length it serves and who chose it


def _live(store: StateStore) -> list[tuple[EngineRecord, process.Tree]]:
    out = []
    for rec in store.all():
        if isinstance(rec, CorruptRecord) or rec.cluster:
            continue
        tree = process.find_tree(rec.pid, process.birth_of(rec), rec.id)
        if tree.alive:
            out.append((rec, tree))
    return out


def _choose_port(store: StateStore, host: str, port: int, explicit: bool,
                 live: list[tuple[EngineRecord, process.Tree]]) -> tuple[int, str | None, portlocks.Claim]:
    """The engine's port: the user's (checked), else the first free one from `port` up that no other program holds
    a lock on (engine/portlocks.py); with the lock taken, for the engine to hold."""
    claimed = {r.port for r, _ in live}
    if explicit:
        if port in claimed:
            other = next(r for r, _ in live if r.port == port)
            raise PortInUse(f"port {port} is used by engine {other.name!r} ({other.model})",
                            hint=f"stop it with `sage-llm stop {other.name}` or choose another --port")
        if not process.port_is_free(host, port):
            pid, pname = process.port_owner(port)
            who = f" by {pname} (pid {pid})" if pid else ""
            raise PortInUse(f"port {port} is already in use{who}",
                            hint="choose another --port, or leave --port out to take the next free one")
        return port, None, portlocks.Claim(True)
    candidate = port
    for _ in range(200):
        if candidate <= 65535 and candidate not in claimed and process.port_is_free(host, candidate):
            lock = portlocks.claim(candidate)  # a port another program reserved but has not bound yet is skipped
            if lock.usable:
                note = None if candidate == port else f"port {port} is busy; using {candidate}"
                return candidate, note, lock
        candidate += 1
    raise PortInUse(f"no free port found from {port} upwards", hint="pass a free --port")


def environ_with(engine_env: Mapping[str, str | None] | None) -> dict[str, str] | None:
    """This process's environment changed by `engine_env` (None values remove), or None when there is nothing to
    change."""
    if not engine_env:
        return None
    merged = {**os.environ, **engine_env}
    return {k: v for k, v in merged.items() if v is not None}


def check_start_timeout(timeout: float) -> None:
    """The one check of `start`'s --timeout (api.resolve_launch runs it before anything else, `start` again)."""
    if timeout <= 0:
        raise UsageError(f"--timeout {timeout:g} must be positive", hint="e.g. --timeout 900")


def check_stop_timeout(timeout: float) -> None:
    """The one check of `stop`'s --timeout (the SIGTERM-to-SIGKILL grace)."""
    if timeout < 0:
        raise UsageError(f"--timeout {timeout:g} must not be negative", hint="e.g. --timeout 30")


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
    engine_env: Mapping[str, str | None] | None = None,
) -> StartResult:
    """Validate, spawn `vllm serve` detached, record it, and (with `wait`) wait until it serves the model.

    `gpus` ("0,1" or UUIDs) pins the GPUs; otherwise those with the most free memory are used. Their free memory is
    checked against --gpu-memory-utilization before spawning, unless `skip_checks` (engine/placement.py).

    `engine_env`: variables only the engine's environment gets, never this process's (a program such as the gateway
    holds an engine's API key in memory and names it in `spec.api_key_env`: it reaches vLLM as VLLM_API_KEY only).
    A None value removes a variable the engine would otherwise inherit from this process."""
    import secrets

    from sage_llm.engine import envs, placement
    from sage_llm.engine.vllm import build_argv, build_env, validate

    store = store or StateStore()
    environ = environ_with(engine_env)
    validate(spec, environ)
    if name is not None:
        validate_name(name)
    check_start_timeout(timeout)
    cmd = envs.resolve_vllm(store.root)
    _check_scaleout(spec, cmd)
    warnings: list[str] = []
    if not is_loopback(spec.host) and not spec.api_key_env:
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
                                   hint="run the start again once `sage-llm stop` has finished")
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
        # engines on a Ray cluster (engine/cluster.py) keep their name too; they are not processes of this machine
        live_names.update({r.name: r for r in store.all() if isinstance(r, EngineRecord) and r.cluster})
        if chosen in live_names:
            if name is not None:
                other = live_names[chosen]
                raise UsageError(
                    f"engine {chosen!r} already runs {other.model} on port {other.port}",
                    hint=f"stop it first (`sage-llm stop {chosen}`) or pick another --name",
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
                                 hint=f"inspect it, then remove it with `sage-llm stop {chosen} --force`")
            base, n = chosen, 2
            while isinstance(store.load(chosen), CorruptRecord) or chosen in live_names:
                chosen = f"{base}-{n}"
                n += 1
        port, note, port_lock = _choose_port(store, spec.host, spec.port, port_explicit, live)
        locked.callback(port_lock.release)  # the engine holds its own copy of the lock from its spawn
        spec.port = port
        engine_id = secrets.token_hex(8)
        cpu_engine = cmd.kind == "cpu" or (cmd.kind is None and _no_gpu())
        dtype = _choose_dtype(spec, cpu_engine)
        argv = build_argv(cmd.prefix, spec, dtype, auto_len=_auto_len(spec, cmd, store.root))
        env, added = build_env(spec, engine_id, cpu_engine, base=environ, offline_ok=cached is True)
        if engine_env and spec.api_key_env in engine_env:
            env.pop(spec.api_key_env, None)  # the key reaches vLLM as VLLM_API_KEY, nowhere else
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
            dtype=dtype.label(), dtype_source=dtype.source,
        )
        store.save(record)  # before spawning: a CLI killed from here on leaves a record to find the engine by
        _rotate_log(log_file)
        with open(log_file, "ab") as fh:
            fh.write(f"\n===== sage llm start {chosen} at {record.started_at}: {' '.join(argv)}\n".encode())
        try:
            spawned = process.spawn(argv, env, log_file, keep_fds=(port_lock.fd,) if port_lock.fd is not None else ())
        except OSError as exc:
            record.state = "failed"
            record.error = f"cannot run {argv[0]}: {exc.strerror}"
            store.save(record)
            raise EngineFailed(record.error, hint="run `sage-llm engine install` to repair the engine") from exc
        record.pid = spawned.pid
        record.create_time = spawned.create_time
        record.start_ticks, record.boot_id = spawned.ticks, spawned.boot_id
        record.state = "running"
        store.save(record)
    result = StartResult(record, port_note=note, warnings=warnings, cached=cached, dtype_note=dtype.line())
    result._popen = spawned.popen  # type: ignore[attr-defined]
    if wait:
        key = (engine_env or {}).get(spec.api_key_env) if spec.api_key_env else None
        result.ready_after_s = wait_ready(record, timeout, store, on_progress, popen=spawned.popen, api_key=key)
        result.dtype_note = dtype.line(engine_dtype(record.log_file))
        result.context_note = context_line(record)
    return result


def _auto_len(spec: LaunchSpec, cmd: Any, root: Path) -> bool:
    """Start with `--max-model-len auto` (the context that fits the KV cache memory): when the user gave no length and
    the engine is a vLLM that takes it (its version from the engine environment's record, else its metadata)."""
    from sage_llm.engine import envs
    from sage_llm.engine.vllm import supports_auto_len

    if spec.max_model_len is not None:
        return False
    recorded = envs.load_recorded(root) if cmd.source == "engine-env" else None
    version = recorded.version if recorded is not None else envs.reported_version(cmd.prefix, timeout=60)
    return supports_auto_len(version)


def context_line(record: EngineRecord) -> str | None:
    """`context: N tokens (...)`: the length the engine serves and who chose it (start's output)."""
    from sage_llm.engine.vllm import fitted_len

    if record.max_model_len is None:
        return None
    fitted = fitted_len(logtools.run_lines(record.log_file))
    if fitted is not None:
        return (f"context: {fitted[1]} tokens (fitted to the KV cache memory: the model's {fitted[0]} does not fit; "
                "--max-model-len to choose)")
    given = [value for flag, value in zip(record.argv, record.argv[1:]) if flag == "--max-model-len"]
    if given and given[-1] == "auto":
        return f"context: {record.max_model_len} tokens (the model's full length fits)"
    if given:
        return f"context: {record.max_model_len} tokens (--max-model-len {given[-1]})"
    return f"context: {record.max_model_len} tokens (the model's length)"


def _mark_ready(record: EngineRecord, store: StateStore, p: Any) -> None:
    """Write into the record that the engine is ready (it has allocated its memory) and the context it serves."""

    record.ready_at = record.ready_at or utcnow_iso()
    for m in p.models:
        if m.get("id") == record.served_model_name and isinstance(m.get("max_model_len"), int):
            record.max_model_len = m["max_model_len"]
    if record.max_model_len is None:  # /v1/models behind a key we do not hold: the log says what vLLM chose
        from sage_llm.engine.vllm import fitted_len

        fitted = fitted_len(logtools.run_lines(record.log_file))
        record.max_model_len = fitted[1] if fitted else None
    with store.lock():
        current = store.load(record.name)
        if isinstance(current, EngineRecord) and current.id == record.id and current.state != "failed":
            current.ready_at, current.max_model_len = record.ready_at, record.max_model_len
            store.save(current)


def _choose_dtype(spec: LaunchSpec, cpu_engine: bool) -> Any:
    """engine/vllm.py choose_dtype with what it needs to know of the machine: is the model quantized, how large are
    its weights in float32 (when it is local), how much memory is available."""
    from sage_llm.engine.vllm import choose_dtype

    quantized, fp32_bytes, available = False, None, None
    if cpu_engine and not spec.dtype:
        from sage_llm.models import hf_cache

        try:
            quantized, fp32_bytes = hf_cache.local_weights(spec.model, spec.download_dir)
            import psutil

            available = psutil.virtual_memory().available
        except Exception:  # unknown size: the CPU default stands
            pass
    return choose_dtype(spec, cpu_engine, quantized=quantized, fp32_weight_bytes=fp32_bytes,
                        memory_available=available)


def _rotate_log(log_file: Path, max_bytes: int = 64 * 1024 * 1024) -> None:
    with contextlib.suppress(OSError):
        if log_file.stat().st_size > max_bytes:
            os.replace(log_file, log_file.with_suffix(".log.1"))


def _no_gpu() -> bool:
    from sage_llm.observe import gpu

    return gpu.gpu_count() == 0


def _cache_state(model: str) -> bool | None:
    """True when `model` is a hub id complete in the local HF cache, False when absent, None when unknown/a path."""
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        return None
    try:
        from sage_llm.models import hf_cache

        return hf_cache.is_cached(model)
    except Exception:
        return None


def _already(rec: EngineRecord, store: StateStore, wait: bool, timeout: float, on_progress: ProgressFn | None
             ) -> StartResult:
    result = StartResult(rec, already_running=True)
    if wait:
        result.ready_after_s = wait_ready(rec, timeout, store, on_progress, kill_on_fail=False)
        result.context_note = context_line(rec)
    return result


def wait_ready(
    record: EngineRecord,
    timeout: float,
    store: StateStore,
    on_progress: ProgressFn | None = None,
    popen: Any = None,
    kill_on_fail: bool = True,
    poll: float = 0.05,
    api_key: str | None = None,
) -> float:
    """Block until /health is 200 and /v1/models lists the served name; on death or timeout, clean up and raise."""
    from sage_llm.models import hf_cache
    from sage_llm.observe import probe as probes

    started = time.monotonic()
    t0 = parse_iso(record.started_at) or time.time()
    key = api_key or api_key_for(record)
    last_emit = 0.0
    download_dir = (record.settings or {}).get("download_dir")
    loader = LoadProgress(record.log_file, model=record.model, size_lookup=hf_cache.hub_download_size,
                          hf_cache=Path(download_dir).expanduser() if download_dir else None) if on_progress else None

    def emit() -> None:
        assert on_progress is not None
        assert loader is not None
        snap = loader.poll()
        try:
            on_progress({"elapsed_s": time.time() - t0, "log_line": snap.last_line, "record": record,
                         "stage": snap.stage, "progress": snap.progress, "detail": snap.detail,
                         "stage_elapsed_s": snap.stage_elapsed(), "snapshot": snap})
        except Exception:
            # the caller's callback failed: the start fails with its exception, and leaves nothing behind (an engine
            # that was already running is not ours to stop). Ctrl-C (KeyboardInterrupt) only stops the waiting.
            if kill_on_fail:
                _abandon(record, store)
            raise

    while True:
        now = time.monotonic()
        alive = popen.poll() is None if popen is not None else process.leader(record.pid, process.birth_of(record))
        if not alive:
            _fail(record, store, "exited during startup", kill=kill_on_fail)
        p = probes.probe(reachable_host(record.host), record.port,
                         timeout=1.0, api_key=key)
        if p.health == 200 and (record.served_model_name in p.model_ids or p.models_status == 401):
            _mark_ready(record, store, p)
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


def _abandon(record: EngineRecord, store: StateStore) -> None:
    """Stop an engine this start spawned (its whole tree) and forget its record: the start did not happen."""
    stopped = process.stop_tree(record.pid, process.birth_of(record), record.id, timeout=5.0)
    if not stopped.survivors:
        _leftovers(record, owned=stopped.shm_seen)
        store.forget(record.name, record.id)


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
        stopped = process.stop_tree(record.pid, process.birth_of(record), record.id, timeout=5.0)
        if not stopped.survivors:
            _leftovers(record, owned=stopped.shm_seen)
    reason = f"engine {record.name!r} {what}" + (f": {diag.message}" if diag else "")
    hint = diag.hint if diag and diag.hint else f"see `sage-llm logs {record.name} -n 80`"
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
    check_stop_timeout(timeout)
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
                           hint=f"check no engine of it runs, then `sage-llm stop {name} --force` removes the record")
    if rec.cluster:  # api.stop sends these to engine/cluster.py; never signal a local pid for them
        raise UsageError(f"engine {name!r} runs on a node of the Ray cluster {rec.cluster.get('address')}",
                         hint=f"sage-llm stop {name}")
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
    outcome.shm_removed, outcome.notes = _leftovers(rec, {p.pid for p in tree.members}, owned=result.shm_seen)
    store.forget(name, rec.id)
    if gone_before:
        outcome.message = f"engine {name!r} was not running; record removed"
    else:
        how = " (SIGKILL after the grace period)" if result.escalated else (" (forced)" if force else "")
        outcome.message = f"stopped {name!r}{how} in {result.duration_s:.2f} s"
    if not port_free:
        pid, pname = process.port_owner(rec.port)
        outcome.message += f"; port {rec.port} is held by another process ({pname or '?'} pid {pid or '?'})"
    return outcome


# ----------------------------------------------------------------------------------------------------- scale-out
def _check_scaleout(spec: LaunchSpec, cmd: Any) -> None:
    """Before spawning: Ray must be in the engine environment (the GPU count is checked by placement.py)."""
    if not (spec.ray_address and cmd.env_path):
        return
    if not any(Path(cmd.env_path).glob("lib/python*/site-packages/ray/__init__.py")):
        raise UsageError(f"--ray-address needs Ray in the engine environment {cmd.env_path}, and it has none",
                         hint="run `sage-llm engine install --ray` (it adds a pinned Ray)")


def _leftovers(rec: EngineRecord, pids: set[int] | None = None, owned: set[str] | None = None
               ) -> tuple[list[str], list[str]]:
    """Once no process of the engine is left: sweep its /dev/shm leftovers (`owned`: the files its processes were
    seen holding before the stop); with Ray, check its workers are gone.

    Returns (shared-memory files removed, notes about Ray workers still alive). The Ray cluster is left running."""
    removed = process.sweep_shm(rec.create_time or parse_iso(rec.started_at), rec.port, owned=owned or set())
    notes: list[str] = []
    address = (rec.settings or {}).get("ray_address")
    if address:
        from sage_llm.engine import ray_cluster

        left = ray_cluster.wait_workers_gone(rec, address, pids=pids)
        if left:
            notes.append(f"{len(left)} Ray worker(s) of {rec.name!r} still alive on the cluster: " + ", ".join(left)
                         + " (the cluster itself was left running)")
    return removed, notes
