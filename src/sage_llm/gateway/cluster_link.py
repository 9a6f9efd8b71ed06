"""The gateway's link to a Ray cluster: a child process that holds the Ray driver (engine/cluster_worker.py).

The gateway never imports Ray. Every cluster operation (place and start an engine, stop it, ask the agents how
their engines are, whether one died, forget one whose node is lost) is a request to the worker process, answered
within a timeout. When the cluster's head goes away Ray ends the worker after a minute; the requests in flight fail
with cluster.Unreachable (the gateway answers 503 for loads, marks the views unhealthy and goes on routing to the
engines that serve), and the next request starts a new worker, at most once every RESTART_S. Called from the
gateway's worker threads (never its event loop): every method blocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from sage_llm.core.errors import EngineFailed, SageLLMError, UsageError

RESTART_S = 2.0  # a worker that ended is started again at most this often
TIMEOUTS = {"join": 40.0, "views": 15.0, "liveness": 8.0, "abandon": 15.0, "stop": 180.0}


class _Call:
    def __init__(self, on_progress: Any) -> None:
        self.done = threading.Event()
        self.answer: dict[str, Any] = {}
        self.on_progress = on_progress


class ClusterLink:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._write = threading.Lock()  # one request line at a time on the worker's stdin
        self._proc: subprocess.Popen[str] | None = None
        self._calls: dict[int, _Call] = {}
        self._next = 0
        self._ended_at = -1e9
        self._last_words = ""

    # ------------------------------------------------------------------------------------------------ process
    def _ensure(self) -> subprocess.Popen[str]:
        from sage_llm.engine.cluster import Unreachable

        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self._proc
            if time.monotonic() - self._ended_at < RESTART_S:
                raise Unreachable(f"the gateway's Ray worker ended ({self._last_words or 'no reason given'}); "
                                  "it is started again in a moment", hint="is the cluster's head up?")
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sage_llm.engine.cluster_worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1, env=dict(os.environ), close_fds=True)
            threading.Thread(target=self._read, args=(self._proc,), daemon=True, name="cluster-link").start()
            return self._proc

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            call = self._calls.get(doc.get("id")) if isinstance(doc, dict) else None
            if call is None:
                continue
            if "progress" in doc:
                if call.on_progress is not None:
                    with contextlib.suppress(Exception):
                        call.on_progress(doc["progress"])
                continue
            call.answer = doc
            call.done.set()
        proc.wait()
        with self._lock:
            if self._proc is proc:  # it ended by itself (close() lets go of it first)
                self._proc = None
                self._ended_at = time.monotonic()
                self._last_words = f"exit status {proc.returncode}"
            ended = [c for c in self._calls.values() if not c.done.is_set()]
        for call in ended:
            call.answer = {"error": {"type": "Unreachable", "message": "the gateway's Ray worker ended (exit status "
                                     f"{proc.returncode}: the cluster's head may be gone)"}}
            call.done.set()

    def close(self) -> None:
        """End the worker (its stdin closes: it exits; killed if it does not within 5 s)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    # ------------------------------------------------------------------------------------------------ calls
    def call(self, op: str, limit: float | None = None, on_progress: Any = None, **args: Any) -> Any:
        """The operation's result; its failure raised as the library raised it (NotPlaced, Unreachable, UsageError,
        EngineFailed, SageLLMError); Unreachable when no answer comes within `limit` seconds (TIMEOUTS[op])."""
        from sage_llm.engine.cluster import Unreachable

        proc = self._ensure()
        call = _Call(on_progress)
        with self._lock:
            self._next += 1
            rid = self._next
            self._calls[rid] = call
        try:
            try:
                assert proc.stdin is not None
                with self._write:
                    proc.stdin.write(json.dumps({"id": rid, "op": op, "args": args}) + "\n")
                    proc.stdin.flush()
            except (OSError, ValueError):
                raise Unreachable("the gateway's Ray worker is not running", hint="is the cluster's head up?") \
                    from None
            limit = limit if limit is not None else TIMEOUTS.get(op, 60.0)
            if not call.done.wait(limit):
                raise Unreachable(f"the Ray cluster did not answer ({op}) within {limit:g} s",
                                  hint="is the cluster's head up?")
        finally:
            with self._lock:
                self._calls.pop(rid, None)
        if "error" in call.answer:
            raise _rebuilt(call.answer["error"])
        return call.answer.get("result")


def _rebuilt(err: dict[str, Any]) -> SageLLMError:
    from sage_llm.engine.cluster import NotPlaced, Unreachable

    kind, message, hint = err.get("type"), str(err.get("message") or "cluster operation failed"), err.get("hint")
    if kind == "NotPlaced":
        return NotPlaced(message, list(err.get("nodes") or []), hint=hint)
    if kind == "Unreachable":
        return Unreachable(message, hint=hint)
    if kind == "UsageError":
        return UsageError(message, hint=hint)
    if kind == "EngineFailed":
        return EngineFailed(message, hint=hint)
    return SageLLMError(message if kind in ("SageLLMError", None) else f"{kind}: {message}", hint=hint)


LINK = ClusterLink()  # one per gateway process


def attach(views: list[Any], store: Any) -> None:
    """engine/inspect.py's cluster_attach for the gateway: the cluster engines' live state from the worker; when
    the cluster cannot be asked, those views say so (`unhealthy`, with the reason)."""
    names = [v.name for v in views if v.record is not None and v.record.cluster]
    try:
        fields = LINK.call("views", names=names)
    except SageLLMError as exc:
        for v in views:
            if v.name in names:
                v.state, v.error = "unhealthy", f"cannot ask the cluster: {exc.message}"
        return
    for v in views:
        for key, value in (fields.get(v.name) or {}).items():
            setattr(v, key, value)
