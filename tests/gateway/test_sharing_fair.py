"""Fair share of a saturated engine between keys (gateway/fairshare.py): the scheduler alone, then through a real
gateway and the fake vLLM with a fixed capacity."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx

from sage_llm.gateway.fairshare import EngineQueue, max_num_seqs
from tests.gateway.conftest import MODEL_A


def test_max_num_seqs_is_read_from_launch_arguments() -> None:
    assert max_num_seqs(["--max-model-len", "4096", "--max-num-seqs", "4"]) == 4
    assert max_num_seqs(["--max-num-seqs=8"]) == 8
    assert max_num_seqs(["--max-num-seqs"]) is None
    assert max_num_seqs(None) is None


def test_a_one_request_key_goes_before_a_flooding_keys_backlog() -> None:
    async def scenario() -> list[str]:
        q = EngineQueue(capacity=2)
        order: list[str] = []
        done = asyncio.Event()

        async def request(who: str) -> None:
            await q.acquire(who, 32)
            order.append(who)
            await done.wait()  # hold the slot until the test lets go
            q.release()

        tasks = [asyncio.ensure_future(request("A")) for _ in range(10)]
        while q.queued < 8:
            await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(request("B")))
        while q.queued < 9:
            await asyncio.sleep(0)
        assert order == ["A", "A"]  # the engine is full: both slots taken
        done.set()  # every admitted request finishes at once, freeing its slot for the next
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    assert order.index("B") == 2  # the first freed slot goes to B, not to A's 8 waiting requests
    assert len(order) == 11


def test_tokens_weigh_and_idle_shares_are_used_by_others() -> None:
    async def scenario() -> tuple[list[str], int]:
        q = EngineQueue(capacity=1)
        order: list[str] = []
        gate = asyncio.Event()

        async def request(who: str, tokens: int) -> None:
            await q.acquire(who, tokens)
            order.append(who)
            await gate.wait()
            q.release()

        first = asyncio.ensure_future(request("A", 1))  # takes the slot at once
        while not order:
            await asyncio.sleep(0)
        tasks = [asyncio.ensure_future(request("big", 300)) for _ in range(3)]
        tasks += [asyncio.ensure_future(request("small", 100)) for _ in range(6)]
        while q.queued < 9:
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, *tasks)
        return order, q.running

    order, running = asyncio.run(scenario())
    served = order[1:]
    # by tokens: `small` (100 each) gets about three requests for each of `big`'s (300 each) while both wait
    assert served[:4].count("small") >= 2
    assert served.count("big") == 3  # work-conserving: once `small` is done, `big` gets every slot
    assert running == 0


def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    async def scenario() -> list[str]:
        q = EngineQueue(capacity=1)
        order: list[str] = []
        await q.acquire("A", 1)
        gone = asyncio.ensure_future(q.acquire("B", 1))
        later = asyncio.ensure_future(q.acquire("C", 1))
        while q.queued < 2:
            await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        q.release()
        await later
        order.append("C")
        assert q.running == 1
        assert q.queued == 0
        return order

    assert asyncio.run(scenario()) == ["C"]


def test_through_the_gateway_a_one_request_key_is_not_stuck_behind_a_flood(gateway, home: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    from sage_llm.gateway import keys

    config = tmp_path / "config" / "llm.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[gateway.models."{MODEL_A}"]\nargs = ["--max-num-seqs", "2"]\n')  # the engine's capacity
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY_S", "0.02")
    monkeypatch.setenv("FAKE_VLLM_REPLY", " ".join(["tok"] * 8))
    _, a = keys.add("flood")
    _, b = keys.add("single")
    gw = gateway()
    assert gw.chat(MODEL_A, headers={"Authorization": f"Bearer {b}"}).status_code == 200  # loaded
    finished_a: list[float] = []
    lock = threading.Lock()

    def flood() -> None:
        with httpx.Client(base_url=gw.url, timeout=120) as c:
            r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {a}"},
                       json={"model": MODEL_A, "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 200
            with lock:
                finished_a.append(time.monotonic())

    threads = [threading.Thread(target=flood) for _ in range(24)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        engines = gw.gw.share.describe()
        if engines and next(iter(engines.values()))["queued"] >= 16:
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"the flood never queued at the gateway: {gw.gw.share.describe()}")
    assert next(iter(gw.gw.share.describe().values()))["capacity"] == 2
    r = gw.chat(MODEL_A, headers={"Authorization": f"Bearer {b}"})
    assert r.status_code == 200
    with lock:
        done_before_b = len(finished_a)
    for t in threads:
        t.join(120)
    assert len(finished_a) == 24
    # first come, first served would finish (nearly) all 24 of A's requests first; fair share admits B at the next
    # free slot, so only those running or finishing meanwhile are done
    assert done_before_b <= 8, done_before_b
