"""Audit log: one JSON line per state-changing operation, appended to `<state dir>/audit.jsonl` (0600).

Each line: `time` (ISO 8601 UTC), `user`, `pid`, `command` (e.g. "start", "stop", "engine install", "model pull"),
`args` (secrets redacted), `outcome` ("ok", "failed", "error", "interrupted"), `error` (one line, or null),
`duration_s`, and optional `result` facts (engine name, port...). Operations a shared gateway runs for a client
also carry `key`: the name of the gateway key that asked (contextvar `actor`, set by gateway/access.py).

API for other modules:
  * `record(command, args, outcome, duration_s, error=None, result=None)`: append one line.
  * `with operation(command, args) as op: ...; op.result = {...}`: times the block and records "ok", or "error"
    with the exception's message (the exception propagates), or "interrupted" on Ctrl-C.
  * `@audited("model rm")`: the same around a function; arguments are taken from its call.
Writing never raises: an audit failure must not turn a successful operation into a failed one.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from sage_llm.core import paths, records

FILE_NAME = "audit.jsonl"
REDACTED = "***"
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|passw(or)?d|credential|authorization|auth)$|"
                         r"^(api[_-]?key|token|secret|password)", re.IGNORECASE)
_SECRET_FLAG = re.compile(r"(?i)^--?(api-key|hf-token|token|password|secret|[\w-]*-token|[\w-]*-secret)$")
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|sk-[A-Za-z0-9_-]{8,}|ghp_[A-Za-z0-9]{8,}|xox[bp]-[A-Za-z0-9-]{8,})")
_ASSIGN = re.compile(r"(?i)\b([A-Z0-9_]*(API_KEY|TOKEN|SECRET|PASSWORD)[A-Z0-9_]*)=([^\s]+)")

F = TypeVar("F", bound=Callable[..., Any])
# the gateway key (its name, never the secret) on whose behalf this operation runs; None outside a shared gateway
actor: contextvars.ContextVar[str | None] = contextvars.ContextVar("sage_llm_audit_actor", default=None)


def path(root: Path | None = None) -> Path:
    return (root or paths.home()) / FILE_NAME


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return os.environ.get("USER") or str(os.getuid())


def _is_secret_key(key: str) -> bool:
    k = key.lower()
    if k.endswith(("_env", "-env")) or k in ("api_key_env",):
        return False  # the *name* of a variable holding a secret is not a secret
    return bool(_SECRET_KEY.search(k))


def redact(value: Any, key: str | None = None) -> Any:
    """A copy of `value` with secrets replaced by "***": values of secret-named keys, the value after a secret
    flag (`--api-key X`, `--hf-token=X`), `NAME_TOKEN=...` assignments, and anything shaped like a token."""
    if key is not None and _is_secret_key(key) and value not in (None, "", False, True):
        return REDACTED
    if isinstance(value, records.Record):
        value = records.asdict(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        hide_next = False
        for item in value:
            if hide_next:
                out.append(REDACTED)
                hide_next = False
                continue
            if isinstance(item, str):
                flag, eq, _val = item.partition("=")
                if _SECRET_FLAG.match(flag):
                    if eq:
                        out.append(f"{flag}={REDACTED}")
                    else:
                        out.append(item)
                        hide_next = True
                    continue
            out.append(redact(item))
        return out
    if isinstance(value, str):
        value = _ASSIGN.sub(lambda m: f"{m.group(1)}={REDACTED}", value)
        return _SECRET_VALUE.sub(REDACTED, value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return redact(str(value))


def record(command: str, args: Any, outcome: str, duration_s: float, error: str | None = None,
           result: dict[str, Any] | None = None, root: Path | None = None) -> dict[str, Any] | None:
    """Append one line; returns the entry written (None if it could not be written)."""
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "user": _user(),
        **({"key": actor.get()} if actor.get() is not None else {}),
        "pid": os.getpid(),
        "command": command,
        "args": redact(args),
        "outcome": outcome,
        "error": redact(error.splitlines()[0][:500]) if error else None,
        "duration_s": round(duration_s, 3),
    }
    if result:
        entry["result"] = redact(result)
    line = (json.dumps(entry, default=str, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        target = path(root)
        paths.ensure_home(target.parent)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, line)  # one write on an O_APPEND fd: lines from concurrent processes do not interleave
        finally:
            os.close(fd)
    except Exception:
        return None
    return entry


class Operation:
    def __init__(self, command: str, args: Any) -> None:
        self.command = command
        self.args = args
        self.result: dict[str, Any] | None = None
        self.outcome: str | None = None  # set to override "ok", e.g. "failed" when a stop left survivors
        self.error: str | None = None


@contextlib.contextmanager
def operation(command: str, args: Any, root: Path | None = None) -> Iterator[Operation]:
    op = Operation(command, args)
    started = time.monotonic()
    try:
        yield op
    except KeyboardInterrupt:
        record(command, args, "interrupted", time.monotonic() - started, "interrupted (Ctrl-C)", op.result, root)
        raise
    except BaseException as exc:
        from sage_llm.core.errors import UsageError

        if isinstance(exc, UsageError):
            raise  # bad input changed nothing: not an operation, and nothing may be written for it
        if type(exc).__name__ == "Exit" and getattr(exc, "exit_code", 1) == 0:
            record(command, args, op.outcome or "ok", time.monotonic() - started, op.error, op.result, root)
        else:
            msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            record(command, args, "error", time.monotonic() - started, msg, op.result, root)
        raise
    record(command, args, op.outcome or "ok", time.monotonic() - started, op.error, op.result, root)


def audited(command: str | Callable[[dict[str, Any]], str],
            summarize: Callable[[Any, Operation], None] | None = None,
            skip: tuple[str, ...] = ("store", "root", "on_progress", "progress", "on_escalate")) -> Callable[[F], F]:
    """Decorator: record each call of the function. `command` may be computed from the bound arguments;
    `summarize(return_value, op)` may set op.result / op.outcome / op.error."""

    def wrap(fn: F) -> F:
        sig_cache: list[Any] = []  # inspect.signature on first call: keeps `import inspect` off the status path

        @functools.wraps(fn)
        def inner(*a: Any, **kw: Any) -> Any:
            if not sig_cache:
                import inspect

                sig_cache.append(inspect.signature(fn))
            sig = sig_cache[0]
            try:
                bound = sig.bind(*a, **kw)
                bound.apply_defaults()
                given = dict(bound.arguments)
            except TypeError:
                given = {}
            args = {k: v for k, v in given.items() if k not in skip and not callable(v)}
            root = getattr(given.get("store"), "root", None) or given.get("root")
            name = command(args) if callable(command) else command
            with operation(name, args, root=root if isinstance(root, Path) else None) as op:
                value = fn(*a, **kw)
                with contextlib.suppress(Exception):
                    (summarize or summarize_default)(value, op)
                return value

        return inner  # type: ignore[return-value]

    return wrap


def start_command(args: dict[str, Any]) -> str:
    """`manager.start(..., foreground=True)` is `sage-llm run`."""
    return "run" if args.get("foreground") else "start"


def summarize_default(value: Any, op: Operation) -> None:
    """Facts worth keeping from the usual results: a start's engine, a stop's outcome, an installed environment."""
    rec = getattr(value, "record", None)
    if rec is not None and hasattr(rec, "name"):
        op.result = {"engine": rec.name, "port": getattr(rec, "port", None), "pid": getattr(rec, "pid", None),
                     "already_running": getattr(value, "already_running", False)}
    elif hasattr(value, "stopped") and hasattr(value, "survivors"):
        op.result = {"engine": getattr(value, "name", None), "stopped": value.stopped,
                     "already_gone": getattr(value, "already_gone", False),
                     "escalated": getattr(value, "escalated", False),
                     "survivors": [list(s) for s in value.survivors]}
        if not value.stopped:
            op.outcome, op.error = "failed", getattr(value, "message", None) or "processes survived"
    elif hasattr(value, "path") and hasattr(value, "version"):
        op.result = {"path": str(value.path), "version": value.version, "kind": getattr(value, "kind", None)}


def read(n: int | None = None, root: Path | None = None) -> list[dict[str, Any]]:
    """The last `n` entries (all with None), oldest first; unreadable lines are skipped."""
    from sage_llm.core.textfiles import tail_lines

    target = path(root)
    if n is not None:
        lines = tail_lines(target, n)
    else:
        try:
            lines = target.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
    out = []
    for ln in lines:
        try:
            entry = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out
