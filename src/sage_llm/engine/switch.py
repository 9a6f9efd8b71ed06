"""Restart an engine, or switch it to another model, keeping every recorded launch setting unless overridden.

`restart` (and `switch` without rolling) stops the engine and starts it again under the same name and port. A rolling
`switch` starts the new engine under a temporary name on a free port, waits until it serves, then hands the name
over and stops the old engine: clients that re-read `status --json` find the new port. If the new engine fails, it
is cleaned up and the old one keeps serving.

Name hand-over, crash-safe. Every step below holds the state lock, and each record write is an atomic rename, so a CLI
killed at any point leaves every live engine with at least one record (`status` and `stop` keep working; at worst an
engine shows under two names for a moment):
  1. the old engine is recorded under `NAME.old-XXXX` too (its log renamed to match),
  2. `NAME` is replaced by the new engine's record (one os.replace),
  3. the temporary `NAME.next-XXXX` record is removed;
then `NAME.old-XXXX` is stopped like any engine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_llm.core.config import DEFAULT_GPU_UTIL, DEFAULT_STOP_TIMEOUT
from sage_llm.core.errors import EngineFailed, EngineNotFound, SageLLMError, StopIncomplete, UsageError
from sage_llm.core.records import fields, replace
from sage_llm.core.state import CorruptRecord, EngineRecord, StateStore
from sage_llm.engine import manager, process
from sage_llm.engine.vllm import LaunchSpec, validate

LAUNCH_FIELDS = frozenset(fields(LaunchSpec))


@dataclass
class SwitchResult:
    record: EngineRecord  # the engine that now holds the name
    previous: EngineRecord | None  # the engine it replaced
    rolling: bool = False
    ready_after_s: float | None = None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # setting -> (before, after)
    stop: manager.StopOutcome | None = None  # how the previous engine was stopped
    port_note: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        rec = self.record
        return {
            "name": rec.name, "state": "ready", "rolling": self.rolling, "model": rec.model,
            "served_model_name": rec.served_model_name, "host": rec.host, "port": rec.port, "base_url": rec.base_url,
            "pid": rec.pid, "log_file": rec.log_file, "ready_after_s": self.ready_after_s,
            "previous": None if self.previous is None else {
                "model": self.previous.model, "port": self.previous.port, "pid": self.previous.pid,
                "stopped": self.stop.stopped if self.stop else None},
            "changed": {k: {"before": a, "after": b} for k, (a, b) in self.changed.items()},
        }


def spec_from_record(rec: EngineRecord, overrides: dict[str, Any] | None = None) -> LaunchSpec:
    """The engine's recorded launch options with `overrides` (only options the user gave) applied on top."""
    data: dict[str, Any] = {"model": rec.model, "host": rec.host, "port": rec.port,
                            "gpu_memory_utilization": DEFAULT_GPU_UTIL}
    data.update({k: v for k, v in (rec.settings or {}).items() if k in LAUNCH_FIELDS})
    for key, value in (overrides or {}).items():
        if key not in LAUNCH_FIELDS:
            raise UsageError(f"unknown launch option {key!r}", hint="see `sage-llm restart --help`")
        data[key] = value
    data["extra_args"] = list(data.get("extra_args") or [])
    return LaunchSpec(**data)


def _changes(rec: EngineRecord, spec: LaunchSpec) -> dict[str, tuple[Any, Any]]:
    before = spec_from_record(rec).settings()
    after = spec.settings()
    return {k: (before.get(k), after[k]) for k in after if before.get(k) != after[k] and k != "port"}


def _load(name: str, store: StateStore) -> EngineRecord:
    rec = store.load(name)
    if rec is None:
        known = ", ".join(store.names()) or "none"
        raise EngineNotFound(f"no engine named {name!r} (engines: {known})",
                             hint="see `sage-llm status`; start one with `sage-llm start MODEL`")
    if isinstance(rec, CorruptRecord) and rec.newer:
        raise rec.newer_error()
    if isinstance(rec, CorruptRecord):
        raise UsageError(f"engine record {rec.path} is corrupt ({rec.error})",
                         hint=f"remove it with `sage-llm stop {name} --force`, then start again")
    if rec.cluster:
        raise UsageError(f"engine {name!r} runs on a node of the Ray cluster {rec.cluster.get('address')}; restart "
                         "and switch work on local engines only", hint=f"`sage-llm stop {name}`, then `sage-llm start "
                         f"MODEL --cluster {rec.cluster.get('address')}` again")
    if rec.foreground:
        raise UsageError(f"engine {name!r} runs in the foreground of `sage-llm run` (pid {rec.owner_pid})",
                         hint="stop it there (Ctrl-C) and run it again with the new options")
    return rec


def _pinned_gpus(rec: EngineRecord) -> str | None:
    """GPUs the user pinned with --gpus are pinned again; automatically chosen ones are chosen again."""
    chosen = [g for g in rec.gpus or [] if g.get("chosen_by") == "--gpus"]
    if not chosen:
        return None
    return ",".join(str(g.get("uuid") or g.get("index")) for g in chosen)


def _start(spec: LaunchSpec, name: str, port_explicit: bool, gpus: str | None, **kw: Any) -> manager.StartResult:
    return manager.start(spec, name=name, port_explicit=port_explicit, gpus=gpus, **kw)


def _preflight(spec: LaunchSpec, store: StateStore) -> None:
    """Everything `start` checks before spawning, run before the running engine is touched: the options, the engine
    install, and the model's cache (offline with no cached copy is refused here, not after the old engine is gone)."""
    from sage_llm.engine import envs
    from sage_llm.models import hf_cache

    validate(spec)
    envs.resolve_vllm(store.root)
    hf_cache.preflight(spec.model, spec.download_dir)


def restart(
    name: str,
    overrides: dict[str, Any] | None = None,
    gpus: str | None = None,
    timeout: float = 900.0,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    store: StateStore | None = None,
    on_progress: manager.ProgressFn | None = None,
) -> SwitchResult:
    """Stop the engine and start it again under the same name, with its recorded settings plus `overrides`.

    Bad options are refused before anything is stopped. The port stays the recorded one unless overridden."""
    store = store or StateStore()
    rec = _load(name, store)
    spec = spec_from_record(rec, overrides)
    _preflight(spec, store)
    changed = _changes(rec, spec)
    stopped = manager.stop(name, timeout=stop_timeout, store=store)
    if not stopped.stopped:
        raise StopIncomplete(stopped.message, hint="nothing was started; stop the survivors, then retry")
    result = _start(spec, name, True, gpus if gpus is not None else _pinned_gpus(rec), wait=True, timeout=timeout,
                    store=store, on_progress=on_progress)
    return SwitchResult(result.record, rec, rolling=False, ready_after_s=result.ready_after_s, changed=changed,
                        stop=stopped, port_note=result.port_note, warnings=result.warnings)


def switch(
    name: str,
    model: str,
    rolling: bool = False,
    overrides: dict[str, Any] | None = None,
    gpus: str | None = None,
    timeout: float = 900.0,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    store: StateStore | None = None,
    on_progress: manager.ProgressFn | None = None,
) -> SwitchResult:
    """Serve `model` under the engine's name, every other recorded setting kept unless overridden.

    Without `rolling`: a restart with the new model. With `rolling`: start beside, wait ready, hand over, stop old."""
    store = store or StateStore()
    overrides = {**(overrides or {}), "model": model}
    rec = _load(name, store)
    tree = process.find_tree(rec.pid, process.birth_of(rec), rec.id)
    if not rolling or tree.leader is None:
        # nothing serving to keep alive: a plain restart with the new model
        result = restart(name, overrides, gpus=gpus, timeout=timeout, stop_timeout=stop_timeout, store=store,
                         on_progress=on_progress)
        result.rolling = False
        return result
    spec = spec_from_record(rec, overrides)
    port_explicit = "port" in overrides
    if not port_explicit:
        spec.port = rec.port + 1  # the next free port from there
    _preflight(spec, store)
    changed = _changes(rec, spec)
    tag = secrets.token_hex(2)
    temp = f"{name[:50]}.next-{tag}"
    try:
        started = _start(spec, temp, port_explicit, gpus if gpus is not None else _pinned_gpus(rec), wait=True,
                         timeout=timeout, store=store, on_progress=on_progress)
    except EngineFailed as exc:
        _discard(temp, store)
        err = EngineFailed(f"switch to {model} failed, {name!r} keeps serving {rec.model} on port {rec.port}: "
                           f"{exc.message}", hint=exc.hint)
        err.log_tail = getattr(exc, "log_tail", None)  # type: ignore[attr-defined]
        err.diagnosis = getattr(exc, "diagnosis", None)  # type: ignore[attr-defined]
        raise err from exc
    except BaseException:
        # interrupted (Ctrl-C) or refused: the old engine was never touched; do not leave the new one behind
        _discard(temp, store)
        raise
    retiring = hand_over(name, temp, rec, store)
    stopped = manager.stop(retiring, timeout=stop_timeout, store=store)
    current = store.load(name)
    new_rec = current if isinstance(current, EngineRecord) else started.record
    return SwitchResult(new_rec, rec, rolling=True, ready_after_s=started.ready_after_s, changed=changed,
                        stop=stopped, port_note=started.port_note, warnings=started.warnings)


def _discard(temp: str, store: StateStore) -> None:
    """Stop and forget the temporary engine of a failed rolling switch."""
    with contextlib.suppress(SageLLMError):
        outcome = manager.stop(temp, timeout=5.0, store=store)
        if not outcome.stopped:
            manager.stop(temp, timeout=0, force=True, store=store)


def hand_over(name: str, temp: str, old: EngineRecord, store: StateStore, _step: Any = None) -> str:
    """Give `name` to the engine recorded as `temp`; the old engine is re-recorded under a retiring name (returned).

    Crash-safe: see the module docstring. `_step(n)` is a test hook called after each step."""
    step = _step or (lambda _n: None)
    retiring = f"{name[:50]}.old-{old.id[:4] or secrets.token_hex(2)}"
    with store.lock():
        current = store.load(name)
        new = store.load(temp)
        if not (isinstance(current, EngineRecord) and current.id == old.id):
            raise SageLLMError(f"engine {name!r} changed while switching (stopped or restarted elsewhere); the new "
                               f"engine keeps running as {temp!r}",
                               hint=f"see `sage-llm status`; stop it with `sage-llm stop {temp}` if unwanted")
        if not isinstance(new, EngineRecord):
            raise SageLLMError(f"the new engine's record {temp!r} is gone", hint="see `sage-llm status`")
        old_rec = replace(current, name=retiring, log_file=_move_log(current.log_file, store.log_path(retiring)))
        store.save(old_rec)  # 1. the old engine has a second record, under its retiring name
        step(1)
        new_rec = replace(new, name=name, log_file=_move_log(new.log_file, store.log_path(name)))
        store.save(new_rec)  # 2. the name now points at the new engine (atomic rename over NAME.json)
        step(2)
        store.remove(temp)  # 3. the temporary name is gone
        step(3)
    return retiring


def _move_log(src: str, dst: Path) -> str:
    """Rename a log file (the engine keeps writing to it through its open descriptor); the path to record."""
    if not src or Path(src) == dst:
        return src
    try:
        os.replace(src, dst)
    except OSError:
        return src
    return str(dst)
