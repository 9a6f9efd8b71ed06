"""Replicas of one model behind the gateway, over real sockets with the fake engine (tests/fakes/fake_vllm.py):
N local engines of one model on different ports, routed by balance.choose, retried once before the first byte,
replaced when one dies."""

from __future__ import annotations

import os
import signal

from sage_llm.core.state import StateStore
from tests.gateway.conftest import MODEL_A
from tests.gateway.test_lifecycle import card, wait_for


def ready_replicas(gw) -> list[str]:
    return sorted(r["engine"] for r in card(gw, MODEL_A).get("replicas", []) if r["state"] == "ready")


def session_chat(gw, session: str):
    return gw.post("/v1/chat/completions", {"model": MODEL_A, "messages": [{"role": "user", "content": "hi"}]},
                   headers={"x-session-id": session})


def test_two_replicas_serve_one_model_and_a_conversation_keeps_its_replica(gateway) -> None:
    gw = gateway(replicas=[f"{MODEL_A}=2"])
    first = session_chat(gw, "s0")
    assert first.status_code == 200
    two = wait_for(lambda: len(ready_replicas(gw)) == 2 and ready_replicas(gw))
    assert two[0] != two[1]
    ports = {StateStore().load(n).port for n in two}
    assert len(ports) == 2  # two engines of one model, on two ports
    seen: dict[str, str] = {}
    for i in range(16):
        r = session_chat(gw, f"s{i}")
        assert r.status_code == 200
        seen[f"s{i}"] = r.headers["x-sage-llm-engine"]
    assert set(seen.values()) == set(two)  # sixteen conversations use both replicas
    for _ in range(5):  # and each conversation keeps its replica, turn after turn (light load)
        for s, engine in seen.items():
            assert session_chat(gw, s).headers["x-sage-llm-engine"] == engine
    metrics = gw.client.get("/metrics").text
    for engine in two:
        assert f'sage_llm_gateway_replica_choices_total{{model="{MODEL_A}",engine="{engine}",reason="affinity"}}' \
            in metrics
    c = card(gw, MODEL_A)
    assert (c["min_replicas"], c["max_replicas"]) == (2, 2)
    assert [r["replica"] for r in c["replicas"]] == [1, 2]
    assert all("#" not in m["id"] for m in gw.client.get("/v1/models").json()["data"])
    engines = {e["name"]: e for e in gw.client.get("/api/engines").json()["engines"]}
    assert {engines[n]["replica"] for n in two} == {1, 2}
    assert all(engines[n]["node"] is None for n in two)  # engines of this machine


def test_a_request_to_a_dead_replica_is_retried_on_the_other_and_the_replica_is_replaced(gateway) -> None:
    # no refresh during the test: the gateway learns of the death only from the request that fails over to it
    gw = gateway(replicas=[f"{MODEL_A}=2"], refresh_s=3600)
    assert session_chat(gw, "s0").status_code == 200
    two = wait_for(lambda: len(ready_replicas(gw)) == 2 and ready_replicas(gw))
    owner = {}
    i = 0
    while len(set(owner.values())) < 2:
        owner[f"s{i}"] = session_chat(gw, f"s{i}").headers["x-sage-llm-engine"]
        i += 1
    victim = two[0]
    session = next(s for s, e in owner.items() if e == victim)
    dead = StateStore().load(victim)
    os.kill(dead.pid, signal.SIGKILL)
    wait_for(lambda: not _alive(dead.pid))
    r = session_chat(gw, session)  # its replica is dead: nothing reached the client, so it goes to the other
    assert r.status_code == 200, r.text
    assert r.headers["x-sage-llm-engine"] == two[1]
    assert f'engine="{two[1]}",reason="retry"' in gw.client.get("/metrics").text
    # the dead replica is replaced: two ready replicas again, a fresh process in the dead one's place
    wait_for(lambda: len(ready_replicas(gw)) == 2 and all(
        (rec := StateStore().load(n)) is not None and rec.pid != dead.pid for n in ready_replicas(gw)), timeout=60)
    # every lease was handed back: the failed attempt's and the retry's (an idle model can unload after its TTL)
    wait_for(lambda: all(r["in_flight"] == 0 for r in card(gw, MODEL_A)["replicas"]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"


def test_replicas_flag_and_config_are_checked(gateway, tmp_path) -> None:
    import pytest

    from sage_llm.core.errors import UsageError
    from sage_llm.gateway import options
    from tests.gateway.test_lifecycle import write_config

    for bad in ("x", "0", "3:2", "1:65"):
        with pytest.raises(UsageError, match="not a replica count"):
            options.resolve(replicas=[f"{MODEL_A}={bad}"])
    with pytest.raises(UsageError, match="is not MODEL=N"):
        options.resolve(replicas=[MODEL_A])
    write_config(tmp_path, f'[gateway.models."{MODEL_A}"]\nmin_replicas = 1\nmax_replicas = 3\ncapacity = 8\n')
    p = options.resolve().profiles[MODEL_A]
    assert (p.min_replicas, p.max_replicas, p.seqs()) == (1, 3, 8)
    assert options.resolve(replicas=[f"{MODEL_A}=2"]).profiles[MODEL_A].max_replicas == 2  # the flag wins
    opts = options.GatewayOptions.from_json(options.resolve(replicas=[f"{MODEL_A}=2:4"]).to_json())
    assert (opts.profiles[MODEL_A].min_replicas, opts.profiles[MODEL_A].max_replicas) == (2, 4)  # `gateway start`
    write_config(tmp_path, '[gateway]\nscale_out_waiting = 2.5\nscale_out_after = "10s"\nplace_timeout = "20s"\n')
    opts = options.GatewayOptions.from_json(options.resolve().to_json())
    assert (opts.scale_out_waiting, opts.scale_out_s, opts.place_s) == (2.5, 10.0, 20.0)
    for bad, words in (("scale_out_waiting = 0", "is not a positive number"),
                       ('scale_out_waiting = "x"', "is not a positive number"),
                       ('scale_out_after = "soon"', "is not a duration"), ('place_timeout = "0"', "more than 0")):
        write_config(tmp_path, f"[gateway]\n{bad}\n")
        with pytest.raises(UsageError, match=words):
            options.resolve()


def test_a_restarted_gateway_adopts_each_replica_into_its_slot(gateway, home) -> None:
    from tests.gateway.conftest import engine_starts

    gw = gateway(replicas=[f"{MODEL_A}=2"], keep_engines=True)
    assert session_chat(gw, "s0").status_code == 200
    two = wait_for(lambda: len(ready_replicas(gw)) == 2 and ready_replicas(gw))
    gw.stop()
    assert engine_starts(home) == 2
    again = gateway(replicas=[f"{MODEL_A}=2"])
    assert wait_for(lambda: ready_replicas(again) == two)  # both found again, each in its own slot
    c = card(again, MODEL_A)
    assert [(r["replica"], r["engine"]) for r in c["replicas"]] == [(1, two[0]), (2, two[1])]
    for i in range(8):
        assert session_chat(again, f"s{i}").status_code == 200
    assert engine_starts(home) == 2  # nothing started twice


def test_it_scales_out_while_requests_wait_and_in_after_the_ttl(gateway, tmp_path, monkeypatch) -> None:
    import threading

    from tests.gateway.test_lifecycle import held, write_config

    write_config(tmp_path, f'[gateway.models."{MODEL_A}"]\nmin_replicas = 1\nmax_replicas = 2\ncapacity = 1\n')
    gate = tmp_path / "reply-gate"
    monkeypatch.setenv("FAKE_VLLM_REPLY_GATE", str(gate))
    gw = gateway(ttl="2s")
    results: list[int] = []
    threads = [threading.Thread(target=lambda i=i: results.append(session_chat(gw, f"s{i}").status_code))
               for i in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(held(tmp_path, "reply-gate")) == 3, timeout=30)  # 3 in flight on a capacity of 1
    assert len(ready_replicas(gw)) == 1
    # 2 waiting per replica, above the threshold (1) for scale_out_s (3 s): a second replica starts
    two = wait_for(lambda: len(ready_replicas(gw)) == 2 and ready_replicas(gw), timeout=60)
    gate.touch()
    for t in threads:
        t.join(30)
    assert results == [200, 200, 200]
    # idle past the TTL: the replica past min_replicas stops, then the model (all of its replicas idle)
    wait_for(lambda: ready_replicas(gw) == [] and card(gw, MODEL_A)["state"] == "available", timeout=60)
    wait_for(lambda: StateStore().load(two[1]) is None, timeout=60)  # its stop ends with the record (a loaded
    # machine may still be stopping it when replica 1 is already gone)


def test_stopping_the_model_stops_every_replica_and_none_comes_back(gateway) -> None:
    gw = gateway(replicas=[f"{MODEL_A}=2"])
    assert session_chat(gw, "s0").status_code == 200
    two = wait_for(lambda: len(ready_replicas(gw)) == 2 and ready_replicas(gw))
    r = gw.post("/api/local-engine/stop", {"model": MODEL_A})
    assert r.status_code == 200, r.text
    wait_for(lambda: all(StateStore().load(n) is None for n in two))
    c = card(gw, MODEL_A)
    assert c["state"] == "available"
    assert [x["state"] for x in c["replicas"]] == ["available", "available"]

    async def tick() -> None:
        gw.gw.router.machine.tick()

    gw.call(tick)  # a tick after the stop keeps nothing up: the model is not in use
    assert all(x["engine"] is None for x in card(gw, MODEL_A)["replicas"])
