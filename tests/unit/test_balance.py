"""gateway/balance.py: which replica answers (least outstanding requests, with conversation affinity), and the
retry rule. Pure policy: no engines needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

from sage_llm.gateway import balance
from sage_llm.gateway.balance import Balance, Replica, affinity_key, choose, retry_target

SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def replicas(n: int, **outstanding: int) -> list[Replica]:
    return [Replica(f"e{i}", node=f"node-{i}", outstanding=outstanding.get(f"e{i}", 0), capacity=8)
            for i in range(n)]


def conversation(opening: str, turns: int) -> list[dict]:
    """The bodies of a `turns`-turn chat: each turn resends the whole history plus one more user message."""
    history: list[dict] = [SYSTEM]
    bodies = []
    for t in range(turns):
        history.append({"role": "user", "content": f"{opening} (turn {t})" if t == 0 else f"and then {t}?"})
        bodies.append({"model": "m", "messages": [dict(m) for m in history]})
        history.append({"role": "assistant", "content": f"answer {t} " * (t + 1)})
    return bodies


def test_a_ten_turn_conversation_stays_on_one_replica_at_light_load():
    pool = replicas(3)
    seen = Counter()
    for c in range(12):
        picks = {choose(pool, body).replica.engine for body in conversation(f"question number {c}", 10)}
        assert len(picks) == 1, (c, picks)
        seen[picks.pop()] += 1
    assert len(seen) == 3, seen  # and different conversations use every replica
    # the first turn and the tenth have the same key; other conversations have other keys
    bodies = conversation("hello", 10)
    assert affinity_key(bodies[0]) == affinity_key(bodies[9])
    assert affinity_key(bodies[0]) != affinity_key(conversation("goodbye", 1)[0])


def test_without_a_system_prompt_turns_still_share_the_key():
    first = {"messages": [{"role": "user", "content": "hi"}]}
    later = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "more"}]}
    assert affinity_key(first) == affinity_key(later) is not None


def test_session_header_and_user_field_pin_a_conversation_whatever_the_prompt():
    pool = replicas(4)
    by_header = {choose(pool, {"messages": [{"role": "user", "content": f"q{i}"}]},
                        {"X-Session-Id": "alice-1"}).replica.engine for i in range(20)}
    by_user = {choose(pool, {"prompt": f"p{i}", "user": "bob"}).replica.engine for i in range(20)}
    assert len(by_header) == 1
    assert len(by_user) == 1
    assert affinity_key({"prompt": "x"}, {"x-session-id": "s"}).startswith("session:")
    assert affinity_key({"prompt": "x", "user": "u"}).startswith("user:")
    assert affinity_key({"prompt": "x"}).startswith("prefix:")


def test_a_completion_prompt_is_keyed_by_its_bounded_start():
    long = "x" * balance.AFFINITY_BYTES
    assert affinity_key({"prompt": long + "turn one"}) == affinity_key({"prompt": long + "turn two, longer"})
    assert affinity_key({"prompt": ["a list prompt"]}) == affinity_key({"prompt": "a list prompt"})


def test_the_preferred_replica_keeps_the_conversation_until_it_is_overloaded_then_it_spills():
    bodies = conversation("a busy conversation", 3)
    home = choose(replicas(3), bodies[0]).replica.engine
    # busy but not overloaded (under capacity): affinity holds even though other replicas are idle
    busy = [Replica(r.engine, r.node, 7 if r.engine == home else 0, 8) for r in replicas(3)]
    assert choose(busy, bodies[1]).replica.engine == home
    assert choose(busy, bodies[1]).reason == "affinity"
    # at capacity and far above the idlest: the next replica of its ranking, the same one every time
    hot = [Replica(r.engine, r.node, 20 if r.engine == home else 1, 8) for r in replicas(3)]
    spilled = {choose(hot, b).replica.engine for b in bodies}
    assert home not in spilled
    assert len(spilled) == 1
    assert choose(hot, bodies[0]).reason == "spill"
    # once it has drained, the conversation comes back
    assert choose(replicas(3), bodies[2]).replica.engine == home


def _pile(bodies: list[dict], policy: Balance) -> Counter:
    """The requests arrive one after another and none finishes: how many went to each replica."""
    pool = [Replica(f"e{i}", outstanding=0, capacity=2) for i in range(3)]
    counts: Counter = Counter()
    for body in bodies:
        pick = choose(pool, body, policy=policy).replica
        counts[pick.engine] += 1
        pool = [Replica(r.engine, r.node, r.outstanding + (r.engine == pick.engine), r.capacity) for r in pool]
    return counts


def test_one_hot_conversation_spreads_over_every_replica_under_overload():
    body = conversation("a very hot conversation", 1)[0]
    counts = _pile([body] * 30, Balance(slack=2))
    assert set(counts) == {"e0", "e1", "e2"}, counts
    assert max(counts.values()) - min(counts.values()) <= 3, counts  # within the slack (+1) of each other
    # the same requests with affinity never giving way all land on one replica: the check above can fail
    assert len(_pile([body] * 30, Balance(overload=float("inf")))) == 1


def test_many_conversations_spread_over_replicas_under_overload():
    counts = _pile([conversation(f"conversation {c}", 1)[0] for c in range(60)], Balance(slack=2))
    assert set(counts) == {"e0", "e1", "e2"}
    assert max(counts.values()) - min(counts.values()) <= 3, counts


def test_all_overloaded_goes_to_the_least_loaded():
    pool = [Replica("a", outstanding=50, capacity=4), Replica("b", outstanding=30, capacity=4),
            Replica("c", outstanding=40, capacity=4)]
    for i in range(30):
        got = choose(pool, {"prompt": f"anything {i}"}, policy=Balance(slack=5))
        assert got.replica.engine == "b", got


def test_no_key_means_least_outstanding_relative_to_capacity():
    pool = [Replica("big", outstanding=6, capacity=16), Replica("small", outstanding=3, capacity=4)]
    got = choose(pool, {"model": "m"})
    assert got.replica.engine == "big"
    assert got.reason == "least"
    assert got.key is None
    assert choose(pool, None).replica.engine == "big"
    assert choose([], {"prompt": "x"}) is None
    only = choose([Replica("solo", outstanding=99)], {"prompt": "x"})
    assert only.replica.engine == "solo"
    assert only.reason == "only"


def test_removing_a_replica_moves_only_its_own_conversations():
    pool = replicas(4)
    keys = [conversation(f"conv {i}", 1)[0] for i in range(400)]
    before = {i: choose(pool, b).replica.engine for i, b in enumerate(keys)}
    gone = "e2"
    after = {i: choose([r for r in pool if r.engine != gone], b).replica.engine for i, b in enumerate(keys)}
    moved = [i for i in before if before[i] != after[i]]
    assert moved
    assert all(before[i] == gone for i in moved)
    assert all(after[i] != gone for i in after)
    # the others' conversations stayed: every key not on the removed replica kept its replica
    assert all(before[i] == after[i] for i in before if before[i] != gone)
    # and adding one back takes only its share (about a quarter), from every replica
    added = {i: choose(pool + [Replica("e4", capacity=8)], b).replica.engine for i, b in enumerate(keys)}
    taken = [i for i in before if added[i] != before[i]]
    assert all(added[i] == "e4" for i in taken)
    assert 40 <= len(taken) <= 130, len(taken)  # a fifth of 400 = 80; generous bounds for the hash's spread


_SCRIPT = """
import json, sys
from sage_llm.gateway.balance import Replica, choose
pool = [Replica(f"e{i}") for i in range(5)]
out = [choose(pool, {"messages": [{"role": "user", "content": f"q{i}"}]}).replica.engine for i in range(50)]
out += [choose(pool, {"prompt": "p"}, {"x-session-id": f"s{i}"}).replica.engine for i in range(50)]
print(json.dumps(out))
"""


def test_choices_are_the_same_in_every_process():
    """Rendezvous weights come from blake2b, not Python's salted hash(): two gateways (or one restarted) agree."""
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=60,
                              check=True)
        runs.append(json.loads(done.stdout))
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 5  # and it is not a constant


def test_retry_once_on_another_replica_only_before_the_first_byte():
    pool = replicas(3)
    body = conversation("retry me", 1)[0]
    first = choose(pool, body).replica.engine
    again = retry_target(pool, first, body, sent_bytes=0, attempt=1)
    assert again is not None
    assert again.replica.engine != first
    assert retry_target(pool, first, body, sent_bytes=1, attempt=1) is None  # the client saw something
    assert retry_target(pool, first, body, sent_bytes=0, attempt=2) is None  # only once
    assert retry_target([Replica(first)], first, body, sent_bytes=0, attempt=1) is None  # nowhere else to go


def test_odd_bodies_do_not_raise_and_fall_back_to_least_loaded():
    pool = replicas(2, e0=3)
    for body in ({"messages": "not a list"}, {"messages": [1, None, "x"]}, {"messages": []}, {"prompt": 7},
                 {"user": 5}, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, []):
        got = choose(pool, body)  # type: ignore[arg-type]
        assert got is not None
    assert choose(pool, {"messages": [1, None]}).replica.engine == "e1"  # no key: least loaded
    keyed = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert affinity_key(keyed) == affinity_key(json.loads(json.dumps(keyed)))
