"""One state machine per model, fed by one serial queue: the gateway's lifecycle decisions, pure (no I/O).

Every lifecycle decision (load, evict, sleep, wake, TTL unload, crash accounting, stop while loading) is taken here,
from the model's current state, never from a snapshot. Callers `submit` messages; the scheduler handles them one at
a time, in order, synchronously (a message that arrives while another is being handled waits in the queue), so no
decision ever interleaves with another. Whatever takes time (start, stop, sleep, wake, alive checks) is an *effect*:
a coroutine of the `Effects` object, run as a task whose outcome comes back as a message. An outcome carries the
token of the effect that produced it; an outcome whose token is no longer the model's (the load was cancelled, the
model was stopped meanwhile) changes nothing, except that an engine it started is stopped.

`_to` is the only writer of `Model.state`: it refuses a transition the table does not allow, stamps the time, updates
the metrics and publishes the event. docs/gateway.md draws `TRANSITIONS` (tests/gateway/test_machine.py checks the
drawing against the table).

Rules (docs/gateway.md, "On-demand loading, TTL and swapping"):
* A load holds its room (toward --max-engines) from the moment it is decided, before anything is launched. A load
  that finds no room evicts the least recently used idle unpinned engine of the gateway, or waits while another
  load or stop is under way; with every holder busy or pinned it fails at once (503 naming them).
* Only deaths the gateway did not ask for are crashes. An engine stopped from outside (`sage-llm stop`) is a stop.
* A stop while loading cancels the load: what was launched is stopped, the waiting requests fail at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

FAILURE_HOLD_S = 60.0
CRASH_WINDOW_S = 600.0
VRAM_SETTLE_S = (0.5, 1.0, 2.0)  # waits before retrying a start after an unload: free VRAM shows up late
FREED_RECENTLY_S = 5.0
REFILL_HOLD_S = 5.0  # a replica that found no room to keep min_replicas up is tried again after this


class State(str, Enum):
    AVAILABLE = "available"  # loadable, no engine
    LOADING = "loading"  # a load decided (waiting for room, launching, waking), or an engine seen starting
    READY = "ready"  # an engine serves it
    SLEEPING = "sleeping"  # its engine (ours) is asleep (vLLM sleep level 1)
    STOPPING = "stopping"  # the gateway is stopping its engine (or putting it to sleep)
    FAILED = "failed"  # a load failed or its engine died twice: held for a while, then retried on request
    GONE = "gone"  # neither loadable nor served any more: removed from the catalogue (terminal)


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.AVAILABLE: frozenset({S.LOADING, S.READY, S.FAILED, S.GONE}),
    S.LOADING: frozenset({S.READY, S.AVAILABLE, S.FAILED, S.STOPPING, S.SLEEPING, S.GONE}),
    S.READY: frozenset({S.STOPPING, S.AVAILABLE, S.LOADING, S.FAILED, S.GONE}),
    S.SLEEPING: frozenset({S.LOADING, S.STOPPING, S.AVAILABLE, S.FAILED, S.GONE}),
    S.STOPPING: frozenset({S.AVAILABLE, S.SLEEPING, S.FAILED, S.GONE}),
    S.FAILED: frozenset({S.LOADING, S.READY, S.AVAILABLE, S.STOPPING, S.GONE}),
    S.GONE: frozenset(),
}
DEFAULT_EVENT = {S.LOADING: "loading", S.READY: "ready", S.SLEEPING: "sleeping", S.STOPPING: "stopping",
                 S.AVAILABLE: "stopped", S.FAILED: "failed", S.GONE: "stopped"}


class IllegalTransition(RuntimeError):
    pass


class Refused(Exception):
    """A request the machine answers with an error: HTTP status, message, OpenAI error type and code."""

    def __init__(self, status: int, message: str, type_: str = "service_unavailable", code: str | None = None,
                 retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.retry_after, self.param = retry_after, param


class NoRoom(Exception):
    """Raised by `Effects.start`: the engine would not fit (GPU pre-flight or host RAM, or no node of the cluster has
    its GPUs free); `message` says why. `nodes`: on a cluster, the ids of the nodes where it would fit once engines
    there stop (room is made there and nowhere else); None: this machine."""

    def __init__(self, message: str, nodes: frozenset[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.nodes = nodes


class BadInput(Exception):
    """Raised by `Effects.start`: the model cannot be started as asked (nothing was started)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LoadFailed(Exception):
    """Raised by `Effects.start`: the engine failed to come up; `message` is the diagnosis `start` prints."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Effects(Protocol):
    """What the machine asks of the world (gateway/engines.py: EngineEffects; the tests: a fake)."""

    def start(self, key: str, profile: Any, port: int | None, on_progress: Callable[[dict[str, Any]], None],
              near: str | None = None) -> Awaitable[Any]: ...  # -> Engine; NoRoom / BadInput / LoadFailed
    # near: the node where room was just made for it (a cluster's; None: this machine or Ray's choice)

    def cancel_start(self, key: str) -> Awaitable[None]: ...  # stop whatever the start of `key` launched

    def stop(self, engine: Any) -> Awaitable[str]: ...  # -> message; LoadFailed when it could not

    def sleep(self, engine: Any) -> Awaitable[bool]: ...  # False: not put to sleep (stop it instead)

    def wake(self, engine: Any) -> Awaitable[bool]: ...

    def alive(self, engine: Any) -> Awaitable[str]: ...  # "alive" | "stopped" (deliberately) | "died"

    def present(self, engine: Any) -> bool: ...  # cheap, synchronous: its record still says it runs

    def sweep(self, engine: Any) -> Awaitable[Any]: ...  # a dead engine of ours: remove what is left


@dataclass
class Model:
    key: str  # canonical model id (hub id, or the served name of an external engine)
    profile: Any = None  # options.Profile when the gateway may start it
    cached: bool = False
    engine: Any = None  # engines.Engine
    state: State = State.AVAILABLE
    since: float = field(default_factory=time.monotonic)  # when `state` was entered
    epoch: int = 0  # counts transitions: an observation older than the last one is stale
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    error: str | None = None
    hold_until: float = 0.0
    crashes: list[float] = field(default_factory=list)
    stage: str | None = None
    progress: float | None = None
    loaded_at: float | None = None
    op: str | None = None  # the effect in flight: room | settle | start | wake | drop | stop | sleep
    token: int = 0
    seq: int = 0  # order in which loads were decided (FIFO for room)
    port: int | None = None  # the port asked for by POST /api/local-engine/start
    reason: str | None = None  # why it is stopping
    waiters: list[tuple[asyncio.Future[Any], bool]] = field(default_factory=list)  # (future, leased?)
    stop_waiters: list[asyncio.Future[str]] = field(default_factory=list)
    blocked_by: set[str] = field(default_factory=set)  # victims being stopped to make room for this load
    settle: list[float] = field(default_factory=list)
    wake: bool = False  # the decided load wakes its sleeping engine
    group: str | None = None  # a replica slot: the key of the model it is a replica of (None: the model itself)
    index: int = 1  # which replica (the model itself is 1; its slots `KEY#2`, `KEY#3`, ...)
    pressure_since: float | None = None  # a replicated model: since when its replicas have had requests waiting
    t0: float = 0.0
    near: str | None = None  # on a cluster: the node where room was made for this load (its engine goes there)
    background: bool = False  # a load that keeps min_replicas up (no request waits on it): it never evicts
    refill_after: float = 0.0  # a background load found no room: not tried again before then

    @property
    def owned(self) -> bool:
        return self.engine is not None and bool(self.engine.owned)

    @property
    def loadable(self) -> bool:
        return self.profile is not None and (self.cached or bool(self.profile.configured) or self.group is not None)

    @property
    def pinned(self) -> bool:
        return bool(self.profile and self.profile.pinned)

    @property
    def ours(self) -> bool:
        """Counts toward --max-engines: an engine of ours, or a load of ours (decided, launched or waking)."""
        if self.state == S.LOADING:
            return self.op is not None or self.owned
        return self.state in (S.READY, S.STOPPING) and self.owned


@dataclass
class Config:
    max_engines: int = 0
    max_queue: int = 64
    ttl: float = 900.0
    sleep: bool = False  # put evicted engines to sleep (GPU only; Effects.sleep says no where it cannot)
    scale_out_waiting: float = 1.0  # waiting requests per ready replica that, held for scale_out_s, add a replica
    scale_out_s: float = 3.0


class Scheduler:
    def __init__(self, effects: Effects, config: Config, publish: Callable[..., Any], metrics: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fx = effects
        self.cfg = config
        self.publish = publish
        self.metrics = metrics
        self.clock = clock
        self.models: dict[str, Model] = {}
        self._queue: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._busy = False
        self._tokens = 0
        self._seq = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self.freed_at = -1e9
        self.closing = False

    # ----------------------------------------------------------------------------------------------- the queue
    def submit(self, handler: Callable[..., None], *args: Any) -> None:
        """Handle a message now, or after the one being handled: one at a time, in order."""
        self._queue.append((handler, args))
        if self._busy:
            return
        self._busy = True
        try:
            while self._queue:
                fn, a = self._queue.popleft()
                try:
                    fn(*a)
                    self._pump()
                except Exception as exc:  # a bug (e.g. IllegalTransition): said, and the next message is handled
                    self.publish("warning", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._busy = False

    @property
    def queued(self) -> int:
        return sum(len(m.waiters) for m in self.models.values())

    def model(self, key: str) -> Model:
        m = self.models.get(key)
        if m is None:
            m = self.models[key] = Model(key)
            self.metrics.state(key, None, m.state.value)
        return m

    # ----------------------------------------------------------------------------------------------- transitions
    def _to(self, m: Model, new: State, event: str | None = None, **data: Any) -> None:
        """The only writer of `m.state`."""
        old = m.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"{m.key}: {old.value} -> {new.value}")
        now = self.clock()
        m.state, m.since, m.epoch = new, now, m.epoch + 1
        self.metrics.state(m.key, old.value, new.value)
        if old == S.LOADING and m.op == "start":
            if new == S.READY:
                self.metrics.load(m.key, True, now - m.t0)
            elif new == S.FAILED:
                self.metrics.load(m.key, False)
        if old == S.STOPPING and m.reason and new in (S.AVAILABLE, S.GONE, S.SLEEPING):
            self.metrics.unload(m.key, "slept" if new == S.SLEEPING else m.reason)
        if new != S.LOADING:
            m.stage, m.progress = (("ready", 1.0) if new == S.READY else (None, None))
        engine = data.pop("engine", None) or (m.engine.name if m.engine is not None else None)
        self.publish(event or DEFAULT_EVENT[new], model=m.key, **({"engine": engine} if engine else {}), **data)
        if new == S.GONE:
            self.models.pop(m.key, None)
            self.metrics.state(m.key, new.value, None)

    def _idle(self, m: Model) -> None:
        """No engine left: available if loadable, else gone."""
        m.engine = None
        self._to(m, S.AVAILABLE if m.loadable else S.GONE, reason=m.reason or "engine gone")

    # ----------------------------------------------------------------------------------------------- effects
    def _run(self, m: Model, op: str, aw: Awaitable[Any], done: Callable[[Model, int, Any, BaseException | None],
                                                                        None]) -> None:
        self._tokens += 1
        token = m.token = self._tokens
        m.op = op
        fut = asyncio.ensure_future(aw)
        self._tasks.add(fut)

        def finished(f: asyncio.Future[Any]) -> None:
            self._tasks.discard(f)
            if f.cancelled():
                self.submit(done, m, token, None, asyncio.CancelledError())
            else:
                exc = f.exception()
                self.submit(done, m, token, None if exc else f.result(), exc)
        fut.add_done_callback(finished)

    def _detach(self, aw: Awaitable[Any]) -> None:
        """An effect whose outcome changes no state (sweeping a dead or orphaned engine)."""
        fut = asyncio.ensure_future(aw)
        self._tasks.add(fut)
        fut.add_done_callback(lambda f: (self._tasks.discard(f), f.cancelled() or f.exception()))

    def _current(self, m: Model, token: int) -> bool:
        return self.models.get(m.key) is m and m.token == token and m.op is not None

    # ----------------------------------------------------------------------------------------------- requests
    def acquire(self, m: Model) -> asyncio.Future[Any]:
        """A request wants `m`'s engine: a future of the engine, leased (release it when the request ends)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(self._acquire, m, fut)
        return fut

    def release(self, m: Model) -> None:
        m.inflight = max(0, m.inflight - 1)
        m.last_used = self.clock()

    def _lease(self, m: Model, fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            m.inflight += 1
            m.last_used = self.clock()
            fut.set_result(m.engine)

    def _acquire(self, m: Model, fut: asyncio.Future[Any]) -> None:
        if m.group is not None and (m.state != S.READY or self.models.get(m.key) is not m):
            root = self.models.get(m.group)  # the replica chosen is no longer ready: its model decides
            m = self._ready_member(root) or root if root is not None else m
        if self.models.get(m.key) is not m:
            fut.set_exception(Refused(404, f"model {m.key} is no longer served here", "invalid_request_error",
                                      "model_not_found", param="model"))
            return
        if m.state == S.READY and m.engine is not None:
            if m.engine.static or not m.engine.managed or self.fx.present(m.engine):
                self._lease(m, fut)
                return
            self._down(m, m.engine, "stopped")  # stopped from outside since the last refresh: not routed to
            if self.models.get(m.key) is not m:
                fut.set_exception(Refused(503, f"engine of {m.key} was stopped", code="engine_stopped"))
                return
        if self.queued >= self.cfg.max_queue:
            fut.set_exception(Refused(503, f"{self.queued} requests are already waiting for models to load "
                                      f"(--max-queue {self.cfg.max_queue}); try again shortly", code="queue_full",
                                      retry_after=self.retry_after(m)))
            return
        if m.state in (S.LOADING, S.STOPPING):
            m.waiters.append((fut, True))
            return
        if m.state == S.FAILED and self.clock() < m.hold_until:
            fut.set_exception(Refused(503, f"model {m.key} failed: {m.error}", code="model_load_failed",
                                      retry_after=max(1.0, m.hold_until - self.clock())))
            return
        if m.state == S.SLEEPING or m.loadable:
            m.waiters.append((fut, True))
            self._decide_load(m)
            return
        fut.set_exception(Refused(503, f"model {m.key} is {m.state.value} and the gateway cannot start it (not "
                                  "cached and not configured: pull it first, e.g. `sage-llm models pull "
                                  f"{m.key}`)", code="not_loadable"))

    def start(self, m: Model, port: int | None = None) -> asyncio.Future[Any]:
        """POST /api/local-engine/start: load now (clears a held failure). The future is not leased."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(self._start, m, port, fut)
        return fut

    def _start(self, m: Model, port: int | None, fut: asyncio.Future[Any]) -> None:
        if m.state == S.READY and m.engine is not None:
            fut.set_result(m.engine)
            return
        if m.state == S.FAILED:
            m.hold_until = 0.0
        if m.state in (S.LOADING, S.STOPPING):
            m.waiters.append((fut, False))
            m.port = port if m.state == S.STOPPING else m.port
            return
        if not (m.state == S.SLEEPING or m.loadable):
            fut.set_exception(Refused(400, f"{m.key} is not cached: pull it first (`sage-llm models pull {m.key}` "
                                      "or the panel's Models tab)", "invalid_request_error", "not_cached",
                                      param="model"))
            return
        m.port = port
        m.waiters.append((fut, False))
        self._decide_load(m)

    def stop(self, m: Model, reason: str = "requested") -> asyncio.Future[str]:
        """POST /api/local-engine/stop: stop `m`'s engine, or cancel its load. Requests in flight end with an
        error; requests waiting for the load fail at once."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.submit(self._stop, m, reason, fut)
        return fut

    def _stop(self, m: Model, reason: str, fut: asyncio.Future[str]) -> None:
        if m.state == S.STOPPING:
            m.stop_waiters.append(fut)
            return
        if m.state == S.LOADING and m.op in ("room", "settle") and m.engine is None:
            m.op, m.reason = None, reason  # decided but nothing launched yet: nothing to stop
            self._fail_waiters(m, self._cancelled(m))
            m.blocked_by.clear()
            self._idle(m)
            fut.set_result(f"the load of {m.key} was cancelled (nothing had been started)")
            return
        e = m.engine
        if m.state == S.LOADING and m.op == "start":
            m.reason = reason
            self._fail_waiters(m, self._cancelled(m))
            m.stop_waiters.append(fut)
            self._to(m, S.STOPPING, reason=reason)
            self._run(m, "stop", self.fx.cancel_start(m.key), self._stopped)
            return
        if e is None:
            fut.set_result(f"{m.key} is not running")
            return
        if not e.managed:
            fut.set_exception(Refused(409, f"engine {e.name} was not started by sage-llm; not touching it",
                                      "invalid_request_error", "not_managed"))
            return
        if m.state == S.LOADING:
            self._fail_waiters(m, self._cancelled(m))
        m.reason = reason
        m.stop_waiters.append(fut)
        self._to(m, S.STOPPING, reason=reason)
        self._run(m, "stop", self.fx.stop(e), self._stopped)

    def _cancelled(self, m: Model) -> Refused:
        return Refused(503, f"the load of {m.key} was cancelled: the model was stopped (POST /api/local-engine/stop"
                       " or the panel); send the request again to load it", code="load_cancelled")

    def engine_failed(self, m: Model | None, engine: Any) -> None:
        """A request to `engine` broke off: ask whether it is still alive; a death nobody asked for is a crash."""
        if m is not None and m.engine is not None and m.engine.name == engine.name and m.state == S.READY \
                and m.op is None:
            self._detach(self._check(m, engine))

    async def _check(self, m: Model, engine: Any) -> None:
        how = await self.fx.alive(engine)
        if how != "alive":
            self.submit(self._seen_down, m, engine, how)

    def _seen_down(self, m: Model, engine: Any, how: str) -> None:
        if (self.models.get(m.key) is m and m.engine is not None and m.engine.name == engine.name and m.op is None
                and m.state in (S.READY, S.SLEEPING)):
            self._down(m, engine, how)

    def _down(self, m: Model, engine: Any, how: str) -> None:
        """`m`'s engine is gone and the gateway did not stop it: `how` is "stopped" (by someone else, e.g.
        `sage-llm stop`) or "died" (a crash: counted; a second within CRASH_WINDOW_S holds the model failed)."""
        now = self.clock()
        if how == "stopped":
            m.reason = "stopped outside the gateway"
            self._idle(m)
            m.reason = None
            return
        m.crashes = [t for t in m.crashes if now - t < CRASH_WINDOW_S] + [now]
        if engine.owned or engine.managed:
            # what is left of it, and its record, go first: an engine started in its place before that would find
            # its name taken. Requests meanwhile wait, as for any stop, and load it again after
            m.reason = "died"
            self._to(m, S.STOPPING, reason="died", engine=engine.name)
            self._run(m, "sweep", self.fx.sweep(engine), self._swept)
            return
        self._dead(m, engine)

    def _swept(self, m: Model, token: int, _result: Any, exc: BaseException | None) -> None:
        if not self._current(m, token) or m.state != S.STOPPING:
            return
        m.op, m.reason = None, None
        self.freed_at = self.clock()
        self._dead(m, m.engine)

    def _dead(self, m: Model, engine: Any) -> None:
        """After a death: held failed at the second within CRASH_WINDOW_S, else loadable again (and loaded again
        at once when requests wait)."""
        name = engine.name if engine is not None else m.key
        m.engine = None
        if len(m.crashes) >= 2:
            m.error = (f"engine {name} died {len(m.crashes)} times in {int(CRASH_WINDOW_S / 60)} minutes; not "
                       f"restarting it automatically (see `sage-llm logs {name}`; POST /api/local-engine/start"
                       " retries)")
            m.hold_until = self.clock() + CRASH_WINDOW_S
            self._to(m, S.FAILED, error=m.error, engine=name)
            self._fail_waiters(m, Refused(503, f"model {m.key} failed: {m.error}", code="model_load_failed",
                                          retry_after=CRASH_WINDOW_S))
            return
        m.error = f"engine {name} died; the next request restarts it"
        self._to(m, S.AVAILABLE if m.loadable else S.GONE, "failed", error=m.error, engine=name)
        self._after_stop(m)

    # ----------------------------------------------------------------------------------------------- loading
    def _decide_load(self, m: Model) -> None:
        """A load is decided: the model holds its room from now on (LOADING, op "room" until it is launched)."""
        self._seq += 1
        m.seq, m.t0, m.error, m.settle, m.near = self._seq, self.clock(), None, list(VRAM_SETTLE_S), None
        m.background = False
        m.op, m.wake = "room", m.state == S.SLEEPING and m.engine is not None
        if m.wake:
            self._to(m, S.LOADING, "waking")
        else:
            self._to(m, S.LOADING, stage="waiting_for_room" if self.cfg.max_engines else "launching",
                     progress=None)
        m.stage = "waking" if m.wake else "launching"

    def _holders(self, m: Model) -> list[Model]:
        """Models holding room against `m`: engines of ours awake, loads launched, loads decided before `m`."""
        return [o for o in self.models.values() if o is not m and o.ours
                and not (o.state == S.LOADING and o.op == "room" and o.seq > m.seq)]

    def _pump(self) -> None:
        """Launch the decided loads that have room now, in the order they were decided; make room for the others."""
        for m in sorted((o for o in self.models.values() if o.state == S.LOADING and o.op == "room"),
                        key=lambda o: o.seq):
            if any(self.models.get(k) is not None and self.models[k].state == S.STOPPING for k in m.blocked_by):
                continue  # a victim of ours is still being stopped
            m.blocked_by.clear()
            if not self.cfg.max_engines:
                self._launch(m)
                continue
            holders = self._holders(m)
            if len(holders) < self.cfg.max_engines:
                self._launch(m)
                continue
            leaving = [o for o in holders if o.state == S.STOPPING]
            if len(holders) - len(leaving) < self.cfg.max_engines:
                continue  # room is being freed
            if self._quiet_refill(m, f"--max-engines {self.cfg.max_engines} reached"):
                continue
            victim = self._victim(m, asleep_too=False)
            if victim is not None:
                m.blocked_by.add(victim.key)
                self._evict(victim)
                continue
            if any(o.state == S.LOADING for o in holders):
                continue  # another load is under way: decide once it is over
            busy = ", ".join(f"{o.key} ({'pinned' if o.pinned else f'{o.inflight} in flight'})" for o in holders)
            self._no_room(m, f"--max-engines {self.cfg.max_engines} reached and no engine can be unloaded: {busy}")

    def _launch(self, m: Model) -> None:
        if self.cfg.max_engines and not m.wake:  # it said "waiting_for_room" when it was decided
            self.publish("loading", model=m.key, stage="launching", progress=None)
        if m.wake and m.engine is not None:
            self._run(m, "wake", self.fx.wake(m.engine), self._woke)
            return
        m.engine = None
        self._run(m, "start", self.fx.start(m.key, m.profile, m.port, self._progress_cb(m), near=m.near),
                  self._loaded)

    def _progress_cb(self, m: Model) -> Callable[[dict[str, Any]], None]:
        last: list[Any] = [None]
        token = self._tokens + 1  # the token _run is about to give the start

        def on_progress(info: dict[str, Any]) -> None:  # called on the loop (EngineEffects hops threads)
            now = (info.get("stage"), None if info.get("progress") is None else round(info["progress"], 2))
            if now == last[0] or m.token != token or m.state != S.LOADING:
                return
            last[0] = now
            m.stage, m.progress = now
            self.publish("loading", model=m.key, stage=now[0], progress=now[1], detail=info.get("detail"),
                         elapsed_s=round(info.get("elapsed_s") or 0, 2))
        return on_progress

    def _loaded(self, m: Model, token: int, engine: Any, exc: BaseException | None) -> None:
        if not self._current(m, token) or m.state != S.LOADING:
            if engine is not None:
                self._detach(self.fx.stop(engine))  # a cancelled load that came up anyway
            return
        if engine is not None:
            m.engine, m.loaded_at = engine, time.time()
            self._ready(m, load_s=round(self.clock() - m.t0, 3))
            return
        if isinstance(exc, NoRoom):
            if self._quiet_refill(m, exc.message):
                return
            victim = self._victim(m, asleep_too=True, nodes=exc.nodes)
            m.op = "room"
            if victim is not None:
                m.blocked_by.add(victim.key)
                m.near = victim.engine.node_id if exc.nodes is not None else None
                self._evict(victim)
                return
            if m.settle and self.clock() - self.freed_at < FREED_RECENTLY_S:
                m.op = "settle"
                token = m.token = self._tokens = self._tokens + 1
                asyncio.get_running_loop().call_later(m.settle.pop(0), self.submit, self._settled, m, token)
                return
            self._no_room(m, f"cannot load {m.key}: {exc.message}; no idle engine of the gateway can be unloaded "
                          "to make room")
            return
        if isinstance(exc, BadInput):
            m.op = None
            self._fail_waiters(m, Refused(400, exc.message, "invalid_request_error", "invalid_value", param="model"))
            self._to(m, S.AVAILABLE if m.loadable else S.GONE, "failed", error=exc.message)
            return
        if isinstance(exc, asyncio.CancelledError):
            msg = "the gateway is stopping"
        elif isinstance(exc, LoadFailed):
            msg = exc.message
        else:
            msg = f"{type(exc).__name__}: {exc}"
        m.error, m.hold_until = msg, self.clock() + FAILURE_HOLD_S
        self._to(m, S.FAILED, error=msg)
        m.op = None
        self._fail_waiters(m, Refused(503, f"model {m.key} failed to load: {msg}", code="model_load_failed",
                                      retry_after=FAILURE_HOLD_S))

    def _settled(self, m: Model, token: int) -> None:
        if self._current(m, token) and m.state == S.LOADING and m.op == "settle":
            m.op = "room"

    def _quiet_refill(self, m: Model, message: str) -> bool:
        """A background load (keeping min_replicas up, no request waiting) that found no room gives up for
        REFILL_HOLD_S instead of evicting another model's idle engine: otherwise the two would evict each other."""
        if not m.background or m.waiters:
            return False
        m.op, m.background, m.refill_after = None, False, self.clock() + REFILL_HOLD_S
        m.error = f"no room for replica {m.index} of {m.group or m.key}: {message}; tried again in {REFILL_HOLD_S:g} s"
        self._to(m, S.AVAILABLE if m.loadable else S.GONE, "failed", error=m.error)
        return True

    def _no_room(self, m: Model, message: str) -> None:
        m.op = None
        self._fail_waiters(m, Refused(503, message, code="no_memory", retry_after=self.retry_after(m)))
        if m.engine is not None:  # a wake that found no room: it sleeps on
            self._to(m, S.SLEEPING, "failed", error=message)
        else:
            self._to(m, S.AVAILABLE if m.loadable else S.GONE, "failed", error=message)

    def _ready(self, m: Model, event: str | None = None, **data: Any) -> None:
        self._to(m, S.READY, event, **data)
        m.op, m.port, m.error, m.last_used, m.near = None, None, None, self.clock(), None
        waiters, m.waiters = m.waiters, []
        for fut, leased in waiters:
            if leased:
                self._lease(m, fut)
            elif not fut.done():
                fut.set_result(m.engine)

    def _woke(self, m: Model, token: int, ok: Any, exc: BaseException | None) -> None:
        if not self._current(m, token) or m.state != S.LOADING:
            return
        if ok and exc is None:
            self._ready(m, woke=True)
            return
        self._run(m, "drop", self.fx.stop(m.engine), self._dropped)  # could not wake: stop it, load afresh

    def _dropped(self, m: Model, token: int, _msg: Any, exc: BaseException | None) -> None:
        if self._current(m, token) and m.state == S.LOADING:
            m.engine, m.op, m.wake = None, "room", False

    def _fail_waiters(self, m: Model, error: Exception) -> None:
        waiters, m.waiters = m.waiters, []
        for fut, _leased in waiters:
            if not fut.done():
                fut.set_exception(error)

    def retry_after(self, m: Model | None = None) -> float:
        known = self.metrics.load_seconds.get(m.key) if m is not None else None
        return max(1.0, round(known or 30.0))

    # ----------------------------------------------------------------------------------------------- unloading
    def _victim(self, exclude: Model, asleep_too: bool, nodes: frozenset[str] | None = None) -> Model | None:
        """The least recently used idle unpinned engine of ours (asleep ones too when memory, not count, is short);
        `nodes`: only one running on those nodes of a cluster (where the load would fit once it is gone)."""
        states = (S.READY, S.SLEEPING) if asleep_too else (S.READY,)
        cands = [o for o in self.models.values() if o is not exclude and o.owned and o.state in states
                 and (o.group or o.key) != (exclude.group or exclude.key)
                 and o.inflight == 0 and not o.pinned and o.op is None and not o.waiters
                 and (nodes is None or o.engine.node_id in nodes)]
        return min(cands, key=lambda o: o.last_used, default=None)

    def _evict(self, m: Model, reason: str = "evicted") -> None:
        asleep = m.state == S.SLEEPING
        m.reason = reason
        self._to(m, S.STOPPING, reason=reason)
        if self.cfg.sleep and not asleep:
            self._run(m, "sleep", self.fx.sleep(m.engine), self._slept)
        else:
            self._run(m, "stop", self.fx.stop(m.engine), self._stopped)

    def _slept(self, m: Model, token: int, ok: Any, exc: BaseException | None) -> None:
        if not self._current(m, token) or m.state != S.STOPPING:
            return
        if ok and exc is None:
            m.op = None
            self.freed_at = self.clock()
            self._to(m, S.SLEEPING, level=1)
            m.reason = None
            self._after_stop(m)
            return
        self._run(m, "stop", self.fx.stop(m.engine), self._stopped)

    def _stopped(self, m: Model, token: int, msg: Any, exc: BaseException | None) -> None:
        if not self._current(m, token) or m.state != S.STOPPING:
            return
        m.op = None
        waiters, m.stop_waiters = m.stop_waiters, []
        if exc is not None:
            m.error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            m.reason = None
            self._to(m, S.FAILED, error=m.error)
            for f in waiters:
                if not f.done():
                    f.set_exception(Refused(500, m.error, "server_error", "stop_failed"))
            self._fail_waiters(m, Refused(503, f"model {m.key}: {m.error}", code="model_load_failed"))
            return
        self.freed_at = self.clock()
        name = m.engine.name if m.engine is not None else None
        text = msg if isinstance(msg, str) and msg else f"the load of {m.key} was cancelled; what it had launched " \
            "was stopped"
        m.engine = None
        if not m.loadable:
            self._fail_waiters(m, Refused(503, f"model {m.key} was stopped and the gateway cannot start it (not "
                                          "cached and not configured)", code="not_loadable"))
        self._to(m, S.AVAILABLE if m.loadable else S.GONE, reason=m.reason, **({"engine": name} if name else {}))
        m.reason = None
        for f in waiters:
            if not f.done():
                f.set_result(text)
        self._after_stop(m)

    def _after_stop(self, m: Model) -> None:
        """Requests that arrived while `m` was being stopped or put to sleep load it again."""
        if m.waiters and self.models.get(m.key) is m:
            self._decide_load(m)

    def tick(self) -> None:
        """Idle TTL: stop engines of ours that served nothing for their TTL (never pinned or busy ones)."""
        self.submit(self._tick)

    def _tick(self) -> None:
        now = self.clock()
        for m in list(self.models.values()):
            if not m.owned or m.pinned or m.inflight or m.op is not None or m.waiters \
                    or m.state not in (S.READY, S.SLEEPING):
                continue
            ttl = m.profile.ttl if m.profile is not None and m.profile.ttl is not None else self.cfg.ttl
            last = m.last_used
            if m.profile is not None and m.profile.replicated and m.index <= m.profile.min_replicas:
                members = self.group(m)  # the first min_replicas replicas go together, once all of them idled
                if any(o.inflight or o.waiters for o in members):
                    continue
                last = max(o.last_used for o in members)
            if ttl > 0 and now - last >= ttl:
                m.reason = "idle"
                self._to(m, S.STOPPING, reason="idle")
                self._run(m, "stop", self.fx.stop(m.engine), self._stopped)
        for m in list(self.models.values()):
            if m.group is None and m.profile is not None and m.profile.replicated:
                self._scale(m)

    # ----------------------------------------------------------------------------------------------- replicas
    def group(self, m: Model) -> list[Model]:
        """A model's replicas: the model itself (replica 1), then its slots `KEY#2`, `KEY#3`, ... in order."""
        root = self.models.get(m.group) if m.group is not None else m
        if root is None:
            return [m]
        return [root] + sorted((o for o in self.models.values() if o.group == root.key), key=lambda o: o.index)

    def slot(self, root: Model, index: int) -> Model:
        """Replica `index` of `root` (2 and up), created when first needed; it starts with `root`'s profile."""
        key = f"{root.key}#{index}"
        s = self.models.get(key)
        if s is None:
            s = self.model(key)
            s.group, s.index = root.key, index
        if root.profile is not None:
            s.profile = replace(root.profile, replica=index)
        return s

    def ready_members(self, m: Model) -> list[Model]:
        return [o for o in self.group(m) if o.state == S.READY and o.engine is not None]

    def _ready_member(self, root: Model | None) -> Model | None:
        if root is None:
            return None
        ready = self.ready_members(root)
        return min(ready, key=lambda o: (o.inflight, o.index)) if ready else None

    def scale(self, root: Model) -> None:
        self.submit(self._scale, root)

    def _scale(self, root: Model) -> None:
        """A replicated model in use keeps min_replicas engines (a dead replica is replaced: a crashed slot held
        failed is skipped for the next free one), and gets one more, up to max_replicas, once the requests waiting
        per ready replica (outstanding beyond an engine's capacity) stayed above scale_out_waiting for
        scale_out_s. Scaling in is the TTL's (`_tick`): replicas past min_replicas stop after their own idle TTL."""
        p = root.profile
        if p is None or not p.replicated or root.group is not None or self.models.get(root.key) is not root \
                or self.closing:
            return
        members = self.group(root)
        active = [o for o in members if o.state in (S.LOADING, S.READY) or (o.state == S.STOPPING
                                                                             and o.reason is None)]
        if not any(o.state == S.READY or (o.state == S.LOADING and o.waiters) for o in members):
            root.pressure_since = None
            return  # not in use: nothing to keep up
        want = p.min_replicas
        ready = [o for o in members if o.state == S.READY]
        now = self.clock()
        waiting = sum(max(0, o.inflight - p.seqs()) for o in ready) / max(1, len(ready))
        if ready and waiting > self.cfg.scale_out_waiting and len(active) < p.max_replicas:
            if root.pressure_since is None:
                root.pressure_since = now
            elif now - root.pressure_since >= self.cfg.scale_out_s:
                want = len(active) + 1
                root.pressure_since = None
                self.publish("scale", model=root.key, replicas=want, waiting_per_replica=round(waiting, 2))
        else:
            root.pressure_since = None
        if want <= p.min_replicas and any(o.state == S.LOADING and o.waiters and (o.group or o.key) != root.key
                                          for o in self.models.values()):
            return  # a request of another model waits for a load (maybe for room just made): it goes first
        by_index = {o.index: o for o in members}
        index = 1
        while len(active) < min(want, p.max_replicas) and index <= p.slots:
            o = by_index.get(index) if index > 1 else root
            index += 1
            if o is None:
                o = self.slot(root, index - 1)
            elif o in active or o.state == S.STOPPING or (o.state == S.FAILED and now < o.hold_until):
                continue
            if now < o.refill_after and want <= p.min_replicas:
                break  # no room a moment ago: another slot would find none either
            if o.state in (S.AVAILABLE, S.FAILED, S.SLEEPING) and o.loadable:
                self._decide_load(o)
                o.background = want <= p.min_replicas and not o.waiters
                active.append(o)

    # ----------------------------------------------------------------------------------------------- observing
    def epochs(self) -> dict[str, int]:
        """Taken before an observation: models that changed state since are not reconciled from it."""
        return {k: m.epoch for k, m in self.models.items()}

    def observe(self, found: list[Any], cached: list[str], epochs: dict[str, int], last_settings: dict[str, Any],
                profile_for: Callable[[str], Any], alias: Callable[[str | None, str], None],
                key_of: Callable[[Any], str]) -> None:
        self.submit(self._observe, found, cached, epochs, last_settings, profile_for, alias, key_of)

    def _observe(self, found: list[Any], cached: list[str], epochs: dict[str, int], last_settings: dict[str, Any],
                 profile_for: Callable[[str], Any], alias: Callable[[str | None, str], None],
                 key_of: Callable[[Any], str]) -> None:
        epochs = dict(epochs)

        def get(key: str) -> Model:
            if key not in self.models:
                epochs[key] = self.model(key).epoch  # new from this observation: not stale
            return self.models[key]

        for m in self.models.values():
            m.cached = False
        for key in cached:
            m = get(key)
            m.cached = True
            if m.profile is None:
                m.profile = profile_for(key)

        def stale(m: Model) -> bool:
            return m.op is not None or epochs.get(m.key, -1) != m.epoch or m.state == S.STOPPING

        seen: set[str] = set()
        died = {e.name for e in found if e.state == "failed" and e.managed}
        for e in found:
            if e.state not in ("ready", "starting", "unhealthy"):
                continue
            key = key_of(e)
            m = get(key)
            seen.add(key)
            alias(e.served, key)
            alias(e.model, key)
            if e.managed and e.settings:
                last_settings[key] = e.settings
                if m.profile is not None and not m.profile.configured:
                    m.profile.settings = e.settings
            if stale(m):
                continue
            if m.state == S.SLEEPING and m.engine is not None and m.engine.name == e.name:
                continue
            if m.state == S.READY and m.engine is not None and m.engine.name == e.name and e.state == "unhealthy":
                continue  # a slow probe under load is not a failure: the proxy notices a dead engine itself
            if m.engine is None or m.engine.name == e.name or m.engine.state != "ready":
                adopted = m.engine is None and e.owned and e.state == "ready"
                m.engine = e
                m.stage, m.progress = e.stage, e.progress
                new = S.READY if e.state == "ready" else S.LOADING if e.state == "starting" else S.FAILED
                m.error = e.error if new != S.READY else None
                if new == m.state:
                    continue
                if new == S.READY:
                    self._ready(m, "adopted" if adopted else None)
                else:
                    self._to(m, new, **({"error": e.error} if new == S.FAILED else {}))
        for m in list(self.models.values()):
            if m.key in seen or m.engine is None or m.engine.static or stale(m):
                continue
            gone = m.engine
            if m.state in (S.READY, S.SLEEPING):
                self._down(m, gone, "died" if gone.name in died and gone.owned else "stopped")
            elif m.state in (S.LOADING, S.FAILED):
                m.engine = None
                self._fail_waiters(m, Refused(503, f"engine {gone.name} of {m.key} is gone", code="engine_gone"))
                self._to(m, S.AVAILABLE if m.loadable else S.GONE, reason="engine gone")

    # ----------------------------------------------------------------------------------------------- shutdown
    def close(self) -> None:
        self.closing = True
        for fut in list(self._tasks):
            fut.cancel()
        for m in self.models.values():
            self._fail_waiters(m, Refused(503, "the gateway is stopping", code="gateway_stopping"))
            for f in m.stop_waiters:
                if not f.done():
                    f.set_exception(Refused(503, "the gateway is stopping", code="gateway_stopping"))

