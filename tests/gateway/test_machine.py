"""The gateway's per-model state machine (gateway/machine.py), pure: a fake effects object whose start/stop/sleep/wake
return futures the test resolves, a fake clock, no processes, no sockets. Every transition and every race of issue 21
(overlapping loads under --max-engines, a stop from outside, a stop while loading, stale observations), in ms."""

from __future__ import annotations

import asyncio
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sage_llm.gateway.machine import (
    CRASH_WINDOW_S,
    FAILURE_HOLD_S,
    TRANSITIONS,
    BadInput,
    Config,
    IllegalTransition,
    LoadFailed,
    Model,
    NoRoom,
    Refused,
    Scheduler,
    State,
)
from sage_llm.gateway.metrics import Metrics
from sage_llm.gateway.options import Profile

S = State
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Eng:
    name: str
    model: str | None = None
    served: str | None = None
    owned: bool = True
    managed: bool = True
    static: bool = False
    state: str = "ready"
    error: str | None = None
    settings: dict | None = None
    stage: str | None = None
    progress: float | None = None
    node_id: str | None = None


class FakeEffects:
    """Every effect is a future the test resolves; `calls` lists (name, arg, future) in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, asyncio.Future[Any]]] = []
        self.present_ = True
        self.near: dict[str, str | None] = {}  # the node each start was asked to go to

    def _call(self, name: str, arg: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls.append((name, arg, fut))
        return fut

    def start(self, key: str, profile: Any, port: int | None, on_progress: Any, near: str | None = None
              ) -> asyncio.Future[Any]:
        self.near[key] = near
        return self._call("start", key)

    def cancel_start(self, key: str) -> asyncio.Future[Any]:
        return self._call("cancel_start", key)

    def stop(self, engine: Any) -> asyncio.Future[Any]:
        return self._call("stop", engine.name)

    def sleep(self, engine: Any) -> asyncio.Future[Any]:
        return self._call("sleep", engine.name)

    def wake(self, engine: Any) -> asyncio.Future[Any]:
        return self._call("wake", engine.name)

    def alive(self, engine: Any) -> asyncio.Future[Any]:
        return self._call("alive", engine.name)

    def sweep(self, engine: Any) -> asyncio.Future[Any]:
        return self._call("sweep", engine.name)

    def present(self, engine: Any) -> bool:
        return self.present_

    def pending(self, name: str | None = None) -> list[tuple[str, Any, asyncio.Future[Any]]]:
        return [c for c in self.calls if not c[2].done() and (name is None or c[0] == name)]

    def last(self, name: str, arg: Any = None) -> asyncio.Future[Any]:
        return next(c[2] for c in reversed(self.calls) if c[0] == name and (arg is None or c[1] == arg))

    def count(self, name: str, arg: Any = None) -> int:
        return sum(1 for c in self.calls if c[0] == name and (arg is None or c[1] == arg))


class World:
    def __init__(self, **cfg: Any) -> None:
        self.fx = FakeEffects()
        self.now = [1000.0]
        self.events: list[dict[str, Any]] = []
        self.metrics = Metrics()
        self.s = Scheduler(self.fx, Config(**cfg), self.publish, self.metrics, clock=lambda: self.now[0])

    def publish(self, kind: str, **data: Any) -> None:
        self.events.append({"event": kind, **data})

    def add(self, key: str, **profile: Any) -> Model:
        m = self.s.model(key)
        m.profile, m.cached = Profile(model=key, **profile), True
        return m

    def kinds(self, key: str) -> list[str]:
        return [e["event"] for e in self.events if e.get("model") == key]


async def settle() -> None:
    """Let resolved effects' callbacks run (call_soon: a few loop passes, no wall-clock wait)."""
    for _ in range(5):
        await asyncio.sleep(0)


def resolve(fut: asyncio.Future[Any], value: Any = None, exc: BaseException | None = None) -> None:
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def run(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        return asyncio.run(asyncio.wait_for(fn(*a, **kw), 5))
    return wrapper


async def load(w: World, key: str, name: str | None = None, lease: bool = False) -> Eng:
    """Load `key` to ready through start() (no lease) or acquire() (one lease)."""
    m = w.s.models[key]
    fut = w.s.acquire(m) if lease else w.s.start(m)
    await settle()
    e = Eng(name or f"e-{key}", model=key)
    resolve(w.fx.last("start", key), e)
    await settle()
    assert await fut is e
    return e


# ------------------------------------------------------------------------------------------------- the table
def test_the_transition_function_refuses_what_the_table_does_not_allow() -> None:
    w = World()
    m = w.add("a")
    for bad in (S.STOPPING, S.SLEEPING, S.AVAILABLE):
        with pytest.raises(IllegalTransition):
            w.s._to(m, bad)
    assert m.state == S.AVAILABLE
    assert w.events == []
    w.s._to(m, S.GONE)
    assert "a" not in w.s.models
    assert TRANSITIONS[S.GONE] == frozenset()
    assert set(TRANSITIONS) == set(State)


def test_each_transition_stamps_the_time_counts_the_state_and_publishes() -> None:
    w = World()
    m = w.add("a")
    w.now[0] = 1234.5
    epoch = m.epoch
    w.s._to(m, S.LOADING, stage="launching")
    assert (m.since, m.epoch) == (1234.5, epoch + 1)
    assert w.events[-1] == {"event": "loading", "model": "a", "stage": "launching"}
    assert "sage_llm_gateway_models{state=\"loading\"} 1" in w.metrics.render([], 0)
    assert "sage_llm_gateway_models{state=\"available\"} 0" in w.metrics.render([], 0)


@run
async def test_a_failing_message_is_reported_and_the_queue_goes_on() -> None:
    w = World()
    a = w.add("a")

    def broken() -> None:
        w.s._to(a, S.STOPPING)  # available -> stopping is not in the table

    w.s.submit(broken)
    assert w.events[-1]["event"] == "warning"
    assert "IllegalTransition" in w.events[-1]["error"]
    f = w.s.acquire(a)  # the machine still answers
    await settle()
    assert w.fx.count("start", "a") == 1
    assert not f.done()


def test_the_diagram_in_the_docs_is_the_transition_table() -> None:
    text = (ROOT / "docs" / "gateway.md").read_text()
    block = text.split("<!-- state-diagram -->")[1]
    drawn: set[tuple[str, str]] = set()
    sources = set()
    for line in block.splitlines():
        m = re.match(r"^\s*(\w+)\s+->(.*)$", line.split("#")[0])
        if m:
            sources.add(m.group(1))
            drawn |= {(m.group(1), t.strip()) for t in m.group(2).split(",") if t.strip()}
    assert sources == {s.value for s in State}
    table = {(a.value, b.value) for a, targets in TRANSITIONS.items() for b in targets}
    assert drawn == table


# ------------------------------------------------------------------------------------------------- loading
@run
async def test_one_load_for_many_concurrent_requests() -> None:
    w = World()
    m = w.add("a")
    futs = [w.s.acquire(m) for _ in range(30)]
    await settle()
    assert w.fx.count("start") == 1
    assert m.state == S.LOADING
    assert w.s.queued == 30
    e = Eng("e1", model="a")
    resolve(w.fx.last("start"), e)
    await settle()
    assert [await f for f in futs] == [e] * 30
    assert m.state == S.READY
    assert m.inflight == 30
    assert w.s.queued == 0
    assert w.kinds("a") == ["loading", "ready"]
    assert 'sage_llm_gateway_engine_loads_total{model="a",result="ok"} 1' in w.metrics.render([], 0)


@run
async def test_a_failed_load_is_held_then_retried_and_start_clears_the_hold() -> None:
    w = World()
    m = w.add("a")
    f1, f2 = w.s.acquire(m), w.s.acquire(m)
    await settle()
    resolve(w.fx.last("start"), exc=LoadFailed("out of memory (hint: lower it)"))
    await settle()
    for f in (f1, f2):
        with pytest.raises(Refused) as exc:
            await f
        assert exc.value.code == "model_load_failed"
        assert "out of memory" in exc.value.message
    assert m.state == S.FAILED
    with pytest.raises(Refused) as exc:
        await w.s.acquire(m)  # held: answered at once, nothing started
    assert exc.value.retry_after == FAILURE_HOLD_S
    assert w.fx.count("start") == 1
    w.now[0] += FAILURE_HOLD_S + 1
    f3 = w.s.acquire(m)
    await settle()
    assert w.fx.count("start") == 2
    assert m.state == S.LOADING
    resolve(w.fx.last("start"), exc=LoadFailed("again"))
    await settle()
    with pytest.raises(Refused):
        await f3
    w.s.start(m)  # POST /api/local-engine/start retries at once
    await settle()
    assert w.fx.count("start") == 3


@run
async def test_bad_input_found_by_start_holds_nothing() -> None:
    w = World()
    m = w.add("a")
    f = w.s.acquire(m)
    await settle()
    resolve(w.fx.last("start"), exc=BadInput("bad model name"))
    await settle()
    with pytest.raises(Refused) as exc:
        await f
    assert exc.value.status == 400
    assert m.state == S.AVAILABLE
    assert m.hold_until == 0


@run
async def test_a_model_that_is_neither_cached_nor_configured_is_never_started() -> None:
    w = World()
    m = w.s.model("somewhere/else")
    m.profile = Profile(model="somewhere/else")  # e.g. the flags of an engine once seen: not a reason to load it
    for call in (w.s.acquire, w.s.start):
        with pytest.raises(Refused) as exc:
            await call(m)
        assert "pull it first" in exc.value.message
    assert w.fx.calls == []
    m.profile = Profile(model="somewhere/else", configured=True)  # a configured profile may name a directory
    w.s.start(m)
    await settle()
    assert w.fx.count("start") == 1


@run
async def test_queue_limit() -> None:
    w = World(max_queue=2)
    m = w.add("a")
    w.s.acquire(m), w.s.acquire(m)
    with pytest.raises(Refused) as exc:
        await w.s.acquire(m)
    assert exc.value.code == "queue_full"
    assert exc.value.retry_after
    assert w.fx.count("start") == 1


# ------------------------------------------------------------------------------------------------- room
@run
async def test_max_engines_a_loading_engine_holds_its_room_from_the_decision() -> None:
    """Defect 1: B asked 0.5 s after A, both loading: there were two engines and swaps_total 0."""
    w = World(max_engines=1)
    a, b = w.add("a"), w.add("b")
    fa = w.s.start(a)
    fb = w.s.acquire(b)
    await settle()
    assert w.fx.count("start") == 1
    assert w.fx.count("start", "b") == 0
    assert b.state == S.LOADING
    assert b.op == "room"
    ea = Eng("ea", model="a")
    resolve(w.fx.last("start", "a"), ea)
    await settle()
    assert await fa is ea
    # A is ready and idle (the start was not a request): B evicts it, and starts only once A is stopped
    assert a.state == S.STOPPING
    assert w.fx.count("stop", "ea") == 1
    assert w.fx.count("start", "b") == 0
    resolve(w.fx.last("stop", "ea"), "stopped")
    await settle()
    assert a.state == S.AVAILABLE
    assert w.fx.count("start", "b") == 1
    eb = Eng("eb", model="b")
    resolve(w.fx.last("start", "b"), eb)
    await settle()
    assert await fb is eb
    text = w.metrics.render([], 0)
    assert "sage_llm_gateway_swaps_total 1" in text
    assert 'sage_llm_gateway_engine_unloads_total{model="a",reason="evicted"} 1' in text


@run
async def test_max_engines_a_busy_engine_is_not_evicted_and_the_answer_names_it() -> None:
    w = World(max_engines=1)
    a, b = w.add("a"), w.add("b")
    await load(w, "a", lease=True)  # a request in flight
    with pytest.raises(Refused) as exc:
        await w.s.acquire(b)
    assert exc.value.code == "no_memory"
    assert "a (1 in flight)" in exc.value.message
    assert exc.value.retry_after
    assert a.state == S.READY
    assert w.fx.count("stop") == 0
    assert b.state == S.AVAILABLE
    w.s.release(a)
    w.s.acquire(b)  # now A is idle: evicted
    await settle()
    assert a.state == S.STOPPING


@run
async def test_max_engines_pinned_engines_are_never_evicted() -> None:
    w = World(max_engines=1)
    w.add("a", pinned=True)
    b = w.add("b")
    await load(w, "a")
    with pytest.raises(Refused) as exc:
        await w.s.acquire(b)
    assert "a (pinned)" in exc.value.message


@run
async def test_max_engines_loads_decided_in_order_do_not_wait_on_each_other() -> None:
    w = World(max_engines=1)
    a, b, c = w.add("a"), w.add("b"), w.add("c")
    await load(w, "a")
    fb, fc = w.s.acquire(b), w.s.acquire(c)
    await settle()
    assert a.state == S.STOPPING
    resolve(w.fx.last("stop", "e-a"), "ok")
    await settle()
    assert w.fx.count("start", "b") == 1
    assert w.fx.count("start", "c") == 0
    eb = Eng("e-b", model="b")
    resolve(w.fx.last("start", "b"), eb)
    await settle()
    assert await fb is eb
    with pytest.raises(Refused) as exc:  # B is busy with its request: C is told so, not left waiting
        await fc
    assert "b (1 in flight)" in exc.value.message


@run
async def test_no_room_in_memory_evicts_then_retries() -> None:
    w = World()
    a, b = w.add("a"), w.add("b")
    await load(w, "a")
    fb = w.s.acquire(b)
    await settle()
    resolve(w.fx.last("start", "b"), exc=NoRoom("needs 10 GiB, 2 free"))
    await settle()
    assert a.state == S.STOPPING
    assert w.fx.count("start", "b") == 1
    resolve(w.fx.last("stop", "e-a"), "ok")
    await settle()
    assert w.fx.count("start", "b") == 2
    resolve(w.fx.last("start", "b"), Eng("e-b"))
    await settle()
    assert (await fb).name == "e-b"


@run
async def test_no_room_and_nothing_to_evict_is_a_503_naming_why() -> None:
    w = World()
    b = w.add("b")
    fb = w.s.acquire(b)
    await settle()
    resolve(w.fx.last("start", "b"), exc=NoRoom("needs 10 GiB, 2 free"))
    await settle()
    with pytest.raises(Refused) as exc:
        await fb
    assert exc.value.code == "no_memory"
    assert "needs 10 GiB" in exc.value.message
    assert b.state == S.AVAILABLE


@run
async def test_no_room_on_a_cluster_evicts_on_the_node_where_the_load_fits_and_sends_it_there() -> None:
    """Per node: making room for a model that fits only on node X evicts an idle engine on X (even when one on Y is
    the least recently used), and the retried start is asked to go to X."""
    w = World()
    a, b, c = w.add("a"), w.add("b"), w.add("c")
    ea = await load(w, "a")
    ea.node_id = "node-y"  # Y: used longest ago
    w.now[0] += 10
    eb = await load(w, "b")
    eb.node_id = "node-x"  # X
    w.now[0] += 10
    fc = w.s.acquire(c)
    await settle()
    assert w.fx.near["c"] is None  # first try: Ray's choice
    resolve(w.fx.last("start", "c"), exc=NoRoom("no node has 1 GPU free", nodes=frozenset({"node-x"})))
    await settle()
    assert b.state == S.STOPPING  # the one on X
    assert a.state == S.READY  # not the older one on Y
    resolve(w.fx.last("stop", "e-b"), "ok")
    await settle()
    assert w.fx.count("start", "c") == 2
    assert w.fx.near["c"] == "node-x"
    resolve(w.fx.last("start", "c"), Eng("e-c", node_id="node-x"))
    await settle()
    assert (await fc).name == "e-c"
    assert c.near is None


@run
async def test_no_room_on_a_cluster_with_nothing_idle_on_those_nodes_is_a_503() -> None:
    w = World()
    a, c = w.add("a"), w.add("c")
    ea = await load(w, "a")
    ea.node_id = "node-y"
    fc = w.s.acquire(c)
    await settle()
    resolve(w.fx.last("start", "c"), exc=NoRoom("no node has 1 GPU free", nodes=frozenset({"node-x"})))
    await settle()
    with pytest.raises(Refused) as exc:
        await fc
    assert exc.value.code == "no_memory"
    assert a.state == S.READY  # nothing on another node was stopped for it
    assert w.fx.count("stop") == 0


# ------------------------------------------------------------------------------------------------- sleep
@run
async def test_sleep_mode_evicts_by_sleeping_and_wakes_on_request() -> None:
    w = World(max_engines=1, sleep=True)
    a, b = w.add("a"), w.add("b")
    ea = await load(w, "a")
    fb = w.s.acquire(b)
    await settle()
    resolve(w.fx.last("sleep", "e-a"), True)
    await settle()
    assert a.state == S.SLEEPING
    assert a.engine is ea
    resolve(w.fx.last("start", "b"), Eng("e-b"))
    await settle()
    await fb
    w.s.release(b)
    fa = w.s.acquire(a)  # wakes A: B (idle) goes to sleep first
    await settle()
    resolve(w.fx.last("sleep", "e-b"), True)
    await settle()
    resolve(w.fx.last("wake", "e-a"), True)
    await settle()
    assert await fa is ea
    assert a.state == S.READY
    assert "waking" in w.kinds("a")
    assert w.fx.count("start", "a") == 1


@run
async def test_an_engine_that_cannot_sleep_is_stopped() -> None:
    w = World(max_engines=1, sleep=True)
    a, b = w.add("a"), w.add("b")
    await load(w, "a")
    w.s.acquire(b)
    await settle()
    resolve(w.fx.last("sleep", "e-a"), False)
    await settle()
    assert a.state == S.STOPPING
    assert w.fx.count("stop", "e-a") == 1


# ------------------------------------------------------------------------------------------------- TTL
@run
async def test_ttl_unloads_idle_engines_only() -> None:
    w = World(ttl=60)
    a = w.add("a")
    w.add("p", pinned=True)
    await load(w, "a", lease=True)
    await load(w, "p")
    w.now[0] += 120
    w.s.tick()
    assert a.state == S.READY  # a request in flight (a stream): never cut
    w.s.release(a)
    w.s.tick()
    assert a.state == S.READY  # its TTL counts from the end of the last request
    w.now[0] += 61
    w.s.tick()
    assert a.state == S.STOPPING
    assert w.s.models["p"].state == S.READY
    resolve(w.fx.last("stop", "e-a"), "ok")
    await settle()
    assert a.state == S.AVAILABLE
    assert w.events[-1] == {"event": "stopped", "model": "a", "engine": "e-a", "reason": "idle"}


@run
async def test_a_request_during_a_ttl_stop_loads_the_model_again() -> None:
    w = World(ttl=1)
    a = w.add("a")
    await load(w, "a")
    w.now[0] += 5
    w.s.tick()
    f = w.s.acquire(a)
    await settle()
    assert w.fx.count("start", "a") == 1
    resolve(w.fx.last("stop"), "ok")
    await settle()
    assert w.fx.count("start", "a") == 2
    resolve(w.fx.last("start"), Eng("e2"))
    await settle()
    assert (await f).name == "e2"


# ------------------------------------------------------------------------------------------------- stops
@run
async def test_a_stop_while_loading_cancels_the_load_and_fails_the_waiters_at_once() -> None:
    """Defect 5: the stop waited for the load, said "stopped", and a queued request started it again."""
    w = World()
    a = w.add("a")
    waiting = [w.s.acquire(a) for _ in range(3)]
    await settle()
    stop = w.s.stop(a)
    await settle()
    for f in waiting:  # at once, before anything resolves
        assert f.done()
        with pytest.raises(Refused) as exc:
            f.result()
        assert exc.value.code == "load_cancelled"
    assert a.state == S.STOPPING
    assert w.fx.count("cancel_start", "a") == 1
    resolve(w.fx.last("cancel_start"), None)
    await settle()
    assert a.state == S.AVAILABLE
    assert "cancelled" in await stop
    late = Eng("late")
    resolve(w.fx.last("start"), late)  # the launch came up after all: stopped, not used
    await settle()
    assert w.fx.count("stop", "late") == 1
    assert a.engine is None
    assert a.state == S.AVAILABLE
    assert w.fx.count("start") == 1  # nothing started it again


@run
async def test_a_stop_while_waiting_for_room_needs_no_effect() -> None:
    w = World(max_engines=1)
    x, y = w.add("x"), w.add("y")
    w.s.start(x)
    fy = w.s.acquire(y)  # waits behind X's load
    await settle()
    assert y.state == S.LOADING
    assert w.fx.count("start", "y") == 0
    msg = await w.s.stop(y)
    assert "nothing had been started" in msg
    assert y.state == S.AVAILABLE
    with pytest.raises(Refused) as exc:
        await fy
    assert exc.value.code == "load_cancelled"
    assert len(w.fx.calls) == 1  # X's start only


@run
async def test_a_stop_from_outside_is_not_a_crash_and_is_noticed_before_routing() -> None:
    """Defect 4: `sage-llm stop` twice locked the model out as "died 2 times"; or the next request went to the
    stopped engine."""
    w = World()
    a = w.add("a")
    for i in range(3):
        e = await load(w, "a", name=f"e{i}", lease=True)
        w.s.release(a)
        w.s.engine_failed(a, e)  # a request broke off
        await settle()
        resolve(w.fx.last("alive"), "stopped")  # its record is gone / marked stopping: someone stopped it
        await settle()
        assert a.state == S.AVAILABLE
        assert a.crashes == []
    # stopped from outside with no request in flight: the next request is not routed to it
    e = await load(w, "a", name="e9")
    w.fx.present_ = False
    f = w.s.acquire(a)
    await settle()
    assert not f.done()
    assert a.state == S.LOADING
    assert w.events[-2]["event"] == "stopped"
    assert w.events[-2]["reason"] == "stopped outside the gateway"
    assert a.crashes == []


@run
async def test_two_crashes_in_the_window_hold_the_model_failed() -> None:
    """A crash is counted; its engine is swept (STOPPING) before the model is loadable again; the second within
    the window holds it failed."""
    w = World()
    a = w.add("a")
    e = await load(w, "a", name="e1")
    w.s.engine_failed(a, e)
    await settle()
    resolve(w.fx.last("alive"), "died")
    await settle()
    assert a.state == S.STOPPING  # what is left of it goes first
    assert w.fx.count("sweep", "e1") == 1
    resolve(w.fx.last("sweep", "e1"), None)
    await settle()
    assert a.state == S.AVAILABLE
    assert len(a.crashes) == 1
    e = await load(w, "a", name="e2")
    w.s.engine_failed(a, e)
    await settle()
    resolve(w.fx.last("alive"), "died")
    await settle()
    resolve(w.fx.last("sweep", "e2"), None)
    await settle()
    assert a.state == S.FAILED
    assert "died 2 times" in (a.error or "")
    with pytest.raises(Refused) as exc:
        await w.s.acquire(a)
    assert exc.value.retry_after
    assert exc.value.retry_after > CRASH_WINDOW_S - 2


@run
async def test_an_engine_that_answers_again_is_not_a_crash() -> None:
    w = World()
    a = w.add("a")
    e = await load(w, "a")
    w.s.engine_failed(a, e)
    await settle()
    resolve(w.fx.last("alive"), "alive")
    await settle()
    assert a.state == S.READY
    assert a.crashes == []


@run
async def test_a_stop_of_a_ready_model_and_a_failed_stop() -> None:
    w = World()
    a = w.add("a")
    await load(w, "a")
    f = w.s.stop(a)
    await settle()
    assert a.state == S.STOPPING
    resolve(w.fx.last("stop"), exc=LoadFailed("still running after SIGKILL"))
    await settle()
    with pytest.raises(Refused) as exc:
        await f
    assert exc.value.status == 500
    assert a.state == S.FAILED
    assert a.engine is not None
    f = w.s.stop(a)  # stopping it again is allowed
    await settle()
    resolve(w.fx.last("stop"), "stopped")
    await settle()
    assert await f == "stopped"
    assert a.state == S.AVAILABLE


@run
async def test_stopping_a_model_nobody_started_is_refused() -> None:
    w = World()
    m = w.s.model("ext")
    m.engine = Eng("external-9000", owned=False, managed=False)
    w.s._to(m, S.READY)
    with pytest.raises(Refused) as exc:
        await w.s.stop(m)
    assert exc.value.code == "not_managed"
    assert m.state == S.READY


# ------------------------------------------------------------------------------------------------- observing
def key_of(e: Eng) -> str:
    return e.model or e.served or e.name


@run
async def test_refresh_adopts_an_engine_of_ours_and_follows_an_external_one() -> None:
    w = World()
    w.s.observe([Eng("kept", model="a"), Eng("ext", served="hand", owned=False, managed=False, state="starting")],
                ["a"], w.s.epochs(), {}, lambda k: Profile(model=k), lambda n, k: None, key_of)
    a, h = w.s.models["a"], w.s.models["hand"]
    assert a.state == S.READY
    assert w.kinds("a") == ["adopted"]
    assert h.state == S.LOADING
    assert not h.ours
    f = w.s.acquire(h)
    w.s.observe([Eng("kept", model="a"), Eng("ext", served="hand", owned=False, managed=False)], ["a"],
                w.s.epochs(), {}, lambda k: Profile(model=k), lambda n, k: None, key_of)
    assert (await f).name == "ext"
    assert h.state == S.READY
    w.s.observe([Eng("kept", model="a")], ["a"], w.s.epochs(), {}, lambda k: Profile(model=k),
                lambda n, k: None, key_of)
    assert "hand" not in w.s.models  # gone with its engine: it was not loadable


@run
async def test_an_observation_older_than_a_decision_changes_nothing() -> None:
    w = World()
    a = w.add("a")
    epochs = w.s.epochs()  # a refresh starts reading ...
    await load(w, "a")  # ... the load finishes meanwhile ...
    w.s.observe([], ["a"], epochs, {}, lambda k: Profile(model=k), lambda n, k: None, key_of)  # ... then it lands
    assert a.state == S.READY
    assert a.engine is not None
    w.s.observe([], ["a"], w.s.epochs(), {}, lambda k: Profile(model=k), lambda n, k: None, key_of)
    assert a.state == S.AVAILABLE  # a fresh one that misses the engine: it is gone (not a crash: no record)
    assert a.crashes == []


@run
async def test_refresh_tells_a_crash_from_a_stop() -> None:
    w = World()
    a = w.add("a")
    await load(w, "a")
    w.s.observe([Eng("e-a", model="a", state="failed")], ["a"], w.s.epochs(), {}, lambda k: Profile(model=k),
                lambda n, k: None, key_of)
    await settle()
    resolve(w.fx.last("sweep", "e-a"), None)
    await settle()
    assert a.state == S.AVAILABLE
    assert len(a.crashes) == 1
    await load(w, "a", name="e-b")
    w.s.observe([], ["a"], w.s.epochs(), {}, lambda k: Profile(model=k), lambda n, k: None, key_of)
    assert a.state == S.AVAILABLE
    assert len(a.crashes) == 1


@run
async def test_a_model_removed_from_the_cache_is_no_longer_loadable() -> None:
    w = World()
    w.s.observe([], ["a"], w.s.epochs(), {}, lambda k: Profile(model=k), lambda n, k: None, key_of)
    assert w.s.models["a"].loadable
    w.s.observe([], [], w.s.epochs(), {}, lambda k: Profile(model=k), lambda n, k: None, key_of)
    assert not w.s.models["a"].loadable
