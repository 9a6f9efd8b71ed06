"""Replicas in the per-model state machine (gateway/machine.py), pure: the fake effects and clock of
test_machine.py. A replicated model keeps min_replicas engines while in use, replaces a dead one, scales out while
requests wait per replica and in after the TTL; --max-engines counts every replica; an idle sibling is never evicted
to make room for its own model."""

from __future__ import annotations

from sage_llm.gateway.machine import Model, State
from tests.gateway.test_machine import Eng, World, resolve, run, settle

S = State


async def up(w: World, m: Model, name: str) -> Eng:
    """Resolve the pending start of `m` with an engine called `name`."""
    e = Eng(name, model=m.group or m.key)
    resolve(w.fx.last("start", m.key), e)
    await settle()
    assert m.state == S.READY
    assert m.engine is e
    return e


@run
async def test_a_model_in_use_is_kept_at_min_replicas_and_a_dead_replica_is_replaced() -> None:
    w = World()
    a = w.add("a", min_replicas=2, max_replicas=2)
    f = w.s.acquire(a)
    await settle()
    assert w.fx.count("start", "a") == 1
    w.s.scale(a)  # the router asks after each route: replica 2 is decided at once
    await settle()
    assert w.fx.count("start", "a#2") == 1
    r2 = w.s.models["a#2"]
    assert r2.group == "a"
    assert r2.index == 2
    assert r2.profile.replica == 2
    assert r2.state == S.LOADING
    await up(w, a, "a-1")
    assert (await f).name == "a-1"
    await up(w, r2, "a-2")
    assert [o.key for o in w.s.ready_members(a)] == ["a", "a#2"]
    w.s._down(r2, r2.engine, "died")  # replica 2 crashes: the model still serves, and is kept at two replicas
    assert r2.state == S.STOPPING  # what is left of replica 2 (its record, its name) is being removed...
    w.s.tick()
    await settle()
    assert w.fx.count("start", "a#2") == 1  # ...so it is not started again under that name meanwhile,
    assert w.fx.count("start", "a#3") == 1  # the next slot takes its place at once
    resolve(w.fx.last("sweep", "a-2"), None)
    await settle()
    assert r2.state == S.AVAILABLE
    assert a.state == S.READY
    await up(w, w.s.models["a#3"], "a-3")
    assert [o.key for o in w.s.ready_members(a)] == ["a", "a#3"]
    w.s._down(w.s.models["a#3"], w.s.models["a#3"].engine, "died")
    w.s.tick()
    await settle()
    assert w.fx.count("start", "a#2") == 2  # a free slot again: the lowest is used
    assert r2.state == S.LOADING


@run
async def test_a_replica_held_failed_after_two_crashes_is_replaced_by_the_next_slot() -> None:
    w, a, r2 = await two_ready()
    for _ in range(2):
        w.s._down(r2, r2.engine, "died")
        await settle()
        resolve(w.fx.last("sweep", "a-2"), None)
        await settle()
        if r2.state == S.AVAILABLE:
            w.s.tick()
            await settle()
            await up(w, r2, "a-2")
    assert r2.state == S.FAILED
    w.s.tick()
    await settle()
    assert w.fx.count("start", "a#3") == 1  # another slot takes its place: the model keeps two replicas


async def two_ready() -> tuple[World, Model, Model]:
    """A world whose model `a` (min_replicas 2) serves on two ready replicas, a-1 and a-2."""
    w = World()
    a = w.add("a", min_replicas=2, max_replicas=2)
    await load_group(w, a)
    return w, a, w.s.models["a#2"]


async def load_group(w: World, a: Model) -> None:
    f = w.s.acquire(a)
    await settle()
    w.s.scale(a)
    await settle()
    await up(w, a, "a-1")
    await f
    w.s.release(a)
    await up(w, w.s.models["a#2"], "a-2")


@run
async def test_it_scales_out_only_while_requests_keep_waiting_and_never_past_max() -> None:
    w = World(scale_out_waiting=1.0, scale_out_s=3.0)
    a = w.add("a", min_replicas=1, max_replicas=2, capacity=2)
    f = w.s.acquire(a)
    await settle()
    await up(w, a, "a-1")
    await f
    for _ in range(3):  # 4 outstanding on a capacity of 2: 2 waiting per replica
        await w.s.acquire(a)
    w.s.tick()
    await settle()
    assert "a#2" not in w.s.models  # above the threshold, but not yet for scale_out_s
    w.now[0] += 1.0
    w.s.release(a)
    w.s.release(a)  # 2 outstanding: none waiting; the pressure is forgotten
    w.s.tick()
    await settle()
    await w.s.acquire(a)
    await w.s.acquire(a)
    w.s.tick()
    w.now[0] += 2.9
    w.s.tick()
    await settle()
    assert "a#2" not in w.s.models
    w.now[0] += 0.2
    w.s.tick()
    await settle()
    assert w.fx.count("start", "a#2") == 1
    assert any(e["event"] == "scale" and e["replicas"] == 2 for e in w.events)
    await up(w, w.s.models["a#2"], "a-2")
    w.now[0] += 100
    w.s.tick()
    await settle()
    w.now[0] += 100
    w.s.tick()
    await settle()
    assert "a#3" not in w.s.models
    assert w.fx.count("start") == 2


@run
async def test_replicas_past_min_stop_after_their_ttl_the_first_min_only_together() -> None:
    w = World(ttl=60.0)
    a = w.add("a", min_replicas=2, max_replicas=3)
    await load_group(w, a)
    r3 = w.s.slot(a, 3)
    w.s.submit(w.s._decide_load, r3)
    await settle()
    await up(w, r3, "a-3")
    r2 = w.s.models["a#2"]
    w.now[0] += 30
    await w.s.acquire(r2)  # replica 2 busy: replica 1 (idle) must stay, replica 3 (past min) may go
    w.s.release(r2)
    w.now[0] += 40
    w.s.tick()
    await settle()
    assert r3.state == S.STOPPING
    assert w.fx.count("stop", "a-3") == 1
    assert a.state == S.READY
    assert r2.state == S.READY
    resolve(w.fx.last("stop", "a-3"), "stopped")
    await settle()
    w.now[0] += 61
    w.s.tick()
    await settle()
    assert a.state == S.STOPPING
    assert r2.state == S.STOPPING


@run
async def test_max_engines_counts_every_replica_and_a_sibling_is_not_evicted_for_its_own_model() -> None:
    w = World(max_engines=2)
    a = w.add("a", min_replicas=1, max_replicas=3)
    await load_group_of(w, a, 2)
    r3 = w.s.slot(a, 3)
    w.s.submit(w.s._decide_load, r3)
    await settle()
    assert w.fx.count("start", "a#3") == 0
    assert w.fx.count("stop") == 0
    assert r3.state == S.AVAILABLE
    assert w.events[-1]["event"] == "failed"
    b = w.add("b")
    fb = w.s.acquire(b)
    await settle()
    assert w.fx.count("stop") == 1  # another model evicts the least recently used idle replica
    assert not fb.done()


async def load_group_of(w: World, a: Model, n: int) -> None:
    for i in range(1, n + 1):
        m = a if i == 1 else w.s.slot(a, i)
        w.s.submit(w.s._decide_load, m)
        await settle()
        await up(w, m, f"a-{i}")


@run
async def test_a_request_for_a_replica_that_left_goes_to_a_ready_sibling() -> None:
    w, a, r2 = await two_ready()
    w.s._down(r2, r2.engine, "stopped")
    e = await w.s.acquire(r2)  # the router chose replica 2 a moment before it went
    assert e.name == "a-1"
    assert a.inflight == 1
    assert r2.inflight == 0


@run
async def test_keeping_min_replicas_up_never_evicts_another_model_so_the_two_cannot_evict_each_other() -> None:
    """Another model's request evicted an idle replica (room by --max-engines, or by a cluster's GPUs): the load
    that brings the replica back is a background one, which finds no room and waits REFILL_HOLD_S instead of
    evicting that model in turn."""
    from sage_llm.gateway.machine import REFILL_HOLD_S, NoRoom

    w, a, r2 = await two_ready()
    w.now[0] += 5
    a.last_used = w.now[0]  # replica 1 used last: replica 2 is the least recently used
    b = w.add("b")
    fb = w.s.acquire(b)
    await settle()
    resolve(w.fx.last("start", "b"), exc=NoRoom("no node has 1 GPU free", nodes=None))
    await settle()
    assert r2.state == S.STOPPING
    resolve(w.fx.last("stop", "a-2"), "ok")
    await settle()
    await up(w, b, "b-1")
    await fb
    w.s.release(b)
    w.s.tick()  # model a is in use below min_replicas: replica 2 comes back, in the background
    await settle()
    assert w.fx.count("start", "a#2") == 2
    resolve(w.fx.last("start", "a#2"), exc=NoRoom("no node has 1 GPU free", nodes=None))
    await settle()
    assert b.state == S.READY  # not evicted for it
    assert w.fx.count("stop") == 1
    assert r2.state == S.AVAILABLE
    w.s.tick()
    await settle()
    assert w.fx.count("start", "a#2") == 2  # held off
    w.now[0] += REFILL_HOLD_S + 1
    w.s.tick()
    await settle()
    assert w.fx.count("start", "a#2") == 3  # tried again later


@run
async def test_a_replica_is_not_brought_back_while_another_models_request_waits_for_the_room_it_left() -> None:
    """The room an evicted replica left is for the load that evicted it: keeping min_replicas up waits until that
    load is over (else the refill takes the room and the load evicts a second replica)."""
    from sage_llm.gateway.machine import NoRoom

    w, a, r2 = await two_ready()
    w.now[0] += 5
    a.last_used = w.now[0]
    b = w.add("b")
    fb = w.s.acquire(b)
    await settle()
    resolve(w.fx.last("start", "b"), exc=NoRoom("no node has 1 GPU free", nodes=frozenset({None})))
    await settle()
    resolve(w.fx.last("stop", "a-2"), "ok")
    await settle()
    assert w.fx.count("start", "b") == 2  # b's start again, for the room made
    w.s.tick()
    await settle()
    assert w.fx.count("start", "a#2") == 1  # not brought back while b's request waits
    await up(w, b, "b-1")
    await fb
    w.s.tick()
    await settle()
    assert w.fx.count("start", "a#2") == 2  # now
