"""Which log `logs NAME|PORT` shows (a stopped engine's log is still found by name), and when its engine ended.
Reading the log itself is observe/logs.py's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LogTarget:
    name: str
    path: Path
    record: object | None  # the EngineRecord while the engine is recorded


def resolve(target: str | None, store: object | None = None) -> LogTarget:
    """The log to show for NAME|PORT (optional when exactly one engine is recorded). A stopped engine's log is still
    found by name."""
    from sage_llm.core.errors import EngineNotFound, UsageError
    from sage_llm.core.state import EngineRecord, StateStore

    st = store if isinstance(store, StateStore) else StateStore()
    records = [r for r in (st.load(n) for n in st.names()) if isinstance(r, EngineRecord)]
    if target is None:
        if len(records) == 1:
            r = records[0]
            return LogTarget(r.name, Path(r.log_file or st.log_path(r.name)), r)
        if not records:
            past = sorted(p.stem for p in st.logs.glob("*.log")) if st.logs.is_dir() else []
            raise EngineNotFound("no engines are recorded" + (f"; logs of earlier engines: {', '.join(past)}"
                                                              if past else ""),
                                 hint="sage-llm logs NAME" if past else "start one: sage-llm start MODEL")
        listing = ", ".join(f"{r.name} (port {r.port})" for r in records)
        raise UsageError(f"{len(records)} engines are running; say which: {listing}",
                         hint=f"e.g. `sage-llm logs {records[0].name}`")
    from sage_llm.core.state import NAME_RE
    from sage_llm.engine.targets import select

    for r in select(target, records):
        return LogTarget(r.name, Path(r.log_file or st.log_path(r.name)), r)
    if NAME_RE.match(target) and st.log_path(target).exists():
        return LogTarget(target, st.log_path(target), None)
    known = ", ".join(r.name for r in records) or "none"
    what = f"no engine on port {target}" if target.isdigit() else f"no engine or log named {target!r}"
    raise EngineNotFound(f"{what} (engines: {known})", hint="see `sage-llm status`")


def engine_ended(target: LogTarget, store: object | None = None) -> Callable[[], str | None]:
    """For `follow(stop=...)`: a reason once the engine is stopped (record removed or replaced) or has exited."""
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import process

    st = store if isinstance(store, StateStore) else StateStore()
    rec = target.record
    if not isinstance(rec, EngineRecord):
        return lambda: None

    def check() -> str | None:
        cur = st.load(rec.name)
        if not isinstance(cur, EngineRecord) or cur.id != rec.id:
            return f"engine {rec.name!r} was stopped"
        if cur.pid and (born := process.birth_of(cur)) is not None and process.leader(cur.pid, born) is None:
            if cur.state == "stopping":  # `sage-llm stop` is removing it: gone before its record
                return f"engine {rec.name!r} was stopped"
            return f"engine {rec.name!r} exited" + (f": {cur.error}" if cur.error else "")
        return None

    return check
