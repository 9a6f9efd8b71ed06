"""The one rule for naming engines and for resolving NAME|PORT arguments to engines."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, TypeVar

from sage_llm.core.errors import EngineNotFound, UsageError
from sage_llm.core.state import NAME_RE, EngineRecord, StateStore
from sage_llm.engine.discovery import discover_external


class _Addressed(Protocol):
    @property
    def name(self) -> str | None: ...

    @property
    def port(self) -> int | None: ...


E = TypeVar("E", bound=_Addressed)


def slug(model: str) -> str:
    """The default engine name for a model: its last path part, lower case, safe for NAME_RE."""
    last = model.rstrip("/").split("/")[-1] or "engine"
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-._").lower()
    return (s or "engine")[:55]


def matches(target: str, engine: _Addressed) -> bool:
    """Does a NAME|PORT argument name this engine (view or record)? A number is a port unless an engine is named so."""
    return engine.name == target or (target.isdigit() and engine.port == int(target))


def select(target: str, engines: Sequence[E]) -> list[E]:
    """The engines a NAME|PORT argument names: an exact name first, else the engines on that port."""
    by_name = [e for e in engines if e.name == target]
    return by_name or [e for e in engines if matches(target, e)]


def resolve_targets(targets: list[str], all_: bool, store: StateStore) -> list[str]:
    """Engine names for NAME|PORT arguments (or every engine with --all)."""
    names = store.names()
    if all_:
        if targets:
            raise UsageError("give engine names or --all, not both", hint="e.g. `sage-llm stop --all`")
        return names
    if not targets:
        if len(names) == 1:
            return names
        if not names:
            return []
        raise UsageError(f"{len(names)} engines are recorded; say which: {', '.join(names)}",
                         hint="e.g. `sage-llm stop NAME`, or `sage-llm stop --all`")
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
                    f"the engine on port {port} (pid {v.pid}) was not started by sage-llm; not touching it",
                    hint="stop it where it was started (Ctrl-C in its terminal)",
                )
        raise EngineNotFound(f"no engine on port {port}", hint="see `sage-llm status`")
    if not NAME_RE.match(target):
        raise UsageError(f"invalid engine name {target!r}", hint="engine names have no '/' or spaces; "
                         "see `sage-llm status -q`")
    known = ", ".join(names) if names else "none"
    raise EngineNotFound(f"no engine named {target!r} (engines: {known})", hint="see `sage-llm status`")


