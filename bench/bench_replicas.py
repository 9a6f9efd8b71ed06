#!/usr/bin/env python3
"""Replicas behind the gateway (issue 23): throughput, the hop, affinity, and a replica killed under load.

Fake vLLM engines (tests/fakes/fake_vllm.py) of fixed capacity (--max-num-seqs 4; 32 tokens 10 ms apart: about
0.32 s a request, so one engine serves some 12 requests/s at saturation), started by the gateway itself on demand
(`[gateway.models."bench/rep"] replicas = N`), everything on 127.0.0.1:
  1. saturation: 320 streamed requests at concurrency 32 through a gateway with 1 replica, then one with 2;
     throughput = requests / wall time (goal: 2 replicas >= 1.8 x 1 replica);
  2. the hop: TTFT (first content token) p50 at concurrency 1, through the gateway (2 replicas, session header)
     and direct to the engine that answered, interleaved request by request (goal: <= +1 ms);
  3. affinity: 5 conversations x 10 turns at light load (each turn resends the history); replicas per conversation
     (goal: 1);
  4. a replica SIGKILLed at concurrency 32: requests that failed before their first byte (goal: 0), streams cut
     after their first byte (they end with the error event), and the time until two replicas serve again.

  python bench/bench_replicas.py [--requests 320] [--hop 200] [--hop-only] [--src SRC] [--json OUT]
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _proxy as px
import aiohttp
from _common import FAKE_VLLM, ROOT, free_port, machine

MODEL = "bench/rep"
CAPACITY = 4
TOKENS = 32
DELAY_S = 0.01


def gateway(home: Path, replicas: int, src: Path = ROOT / "src") -> px.Proc:
    home.mkdir(parents=True, exist_ok=True)
    config = home / "llm.toml"
    config.write_text(f'[gateway.models."{MODEL}"]\nargs = ["--max-num-seqs", "{CAPACITY}"]\nreplicas = {replicas}\n')
    env = {**os.environ, "PYTHONPATH": str(src), "SAGE_LLM_HOME": str(home), "SAGE_LLM_CONFIG": str(config),
           "SAGE_LLM_VLLM": f"{sys.executable} {FAKE_VLLM}", "FAKE_VLLM_LOAD_S": "0.5",
           "FAKE_VLLM_TOKEN_DELAY_S": str(DELAY_S), "FAKE_VLLM_REPLY": " ".join(["tok"] * TOKENS)}
    port = free_port()
    opts = {"host": "127.0.0.1", "port": port, "ttl": 0, "external": False, "fallback": False,
            "engine_port": free_port()}
    cmd = [sys.executable, "-m", "sage_llm.gateway", "--options", json.dumps(opts)]
    return px.Proc(f"gateway-{replicas}", cmd, port, env=env, cwd=home)


def body(messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"model": MODEL, "stream": True, "messages": messages or [{"role": "user", "content": "hi"}]}


async def stream(s: aiohttp.ClientSession, url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """One streamed request: status, engine, TTFT, whether a byte came, whether it ended with an error event."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"status": None, "engine": None, "ttft": None, "bytes": 0, "error_event": False}
    try:
        async with s.post(url, json=payload, headers=headers or {}) as r:
            out["status"], out["engine"] = r.status, r.headers.get("x-sage-llm-engine")
            async for chunk in r.content.iter_any():
                out["bytes"] += len(chunk)
                if out["ttft"] is None and b'"content": "tok' in chunk:
                    out["ttft"] = time.perf_counter() - t0
                if b'"error"' in chunk:
                    out["error_event"] = True
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        out["exc"] = type(exc).__name__
    return out


async def ready_replicas(s: aiohttp.ClientSession, port: int) -> list[dict[str, Any]]:
    async with s.get(f"http://127.0.0.1:{port}/v1/models") as r:
        cards = {c["id"]: c for c in (await r.json())["data"]}
    card = cards.get(MODEL, {})
    return [x for x in card.get("replicas", [card]) if x.get("state") == "ready"]


async def warm(s: aiohttp.ClientSession, port: int, replicas: int) -> None:
    await stream(s, f"http://127.0.0.1:{port}/v1/chat/completions", body())
    deadline = time.monotonic() + 60
    while len(await ready_replicas(s, port)) < replicas:
        if time.monotonic() > deadline:
            raise SystemExit(f"{replicas} replicas not ready in 60 s")
        await asyncio.sleep(0.1)


async def saturate(s: aiohttp.ClientSession, port: int, n: int, c: int) -> float:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    left = [n]

    async def worker(i: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            r = await stream(s, url, body(), {"x-session-id": f"w{i}-{left[0]}"})
            assert r["status"] == 200, r
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(c)))
    return n / (time.perf_counter() - t0)


async def engine_ports(s: aiohttp.ClientSession, port: int) -> dict[str, dict[str, Any]]:
    async with s.get(f"http://127.0.0.1:{port}/api/engines") as r:
        return {e["name"]: e for e in (await r.json())["engines"]}


async def hop(s: aiohttp.ClientSession, port: int, n: int) -> tuple[float, float]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    first = await stream(s, url, body(), {"x-session-id": "hop"})
    engines = await engine_ports(s, port)
    direct_url = f"http://127.0.0.1:{engines[first['engine']]['port']}/v1/chat/completions"
    # the engine's key: the gateway's per-engine key, derived as the gateway derives it (same state directory)
    from sage_llm.core.state import StateStore
    from sage_llm.gateway.engines import key_for

    rec = StateStore().load(first["engine"])
    auth = {"Authorization": f"Bearer {key_for(rec.api_key_env)}"} if rec and rec.api_key_env else {}
    via, direct = [], []
    for _ in range(n):
        r = await stream(s, url, body(), {"x-session-id": "hop"})
        assert r["engine"] == first["engine"]
        via.append(r["ttft"])
        direct.append((await stream(s, direct_url, body(), auth))["ttft"])
    return statistics.median(direct) * 1000, statistics.median(via) * 1000


async def conversations(s: aiohttp.ClientSession, port: int, n: int = 5, turns: int = 10) -> list[int]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    seen: list[set[str]] = [set() for _ in range(n)]
    history = [[{"role": "system", "content": f"conversation {i} {os.urandom(4).hex()}"},
                {"role": "user", "content": "hello"}] for i in range(n)]
    for _ in range(turns):
        for i in range(n):
            r = await stream(s, url, body(history[i]))
            seen[i].add(r["engine"])
            history[i] += [{"role": "assistant", "content": "tok " * TOKENS}, {"role": "user", "content": "more"}]
    return [len(x) for x in seen]


async def kill_under_load(s: aiohttp.ClientSession, port: int, c: int, seconds: float) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            results.append(await stream(s, url, body(), {"x-session-id": f"k{i}-{k}"}))
    workers = [asyncio.ensure_future(worker(i)) for i in range(c)]
    await asyncio.sleep(seconds)
    engines = await engine_ports(s, port)
    victim = next(e for e in engines.values() if e.get("replica") == 2)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    replaced = None
    while time.monotonic() - killed_at < 60:
        ready = await ready_replicas(s, port)
        if len(ready) == 2 and all(x["engine"] for x in ready) and replaced is None:
            engines = await engine_ports(s, port)
            if all(e["pid"] != victim["pid"] for e in engines.values() if e["name"] in {x["engine"] for x in ready}):
                replaced = time.monotonic() - killed_at
                break
        await asyncio.sleep(0.05)
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*workers)
    before_byte = [r for r in results if r["status"] != 200 or (r["bytes"] == 0 and not r["ttft"])]
    cut = [r for r in results if r["status"] == 200 and r["error_event"]]
    return {"requests": len(results), "failed_before_first_byte": len(before_byte),
            "streams_cut_after_first_byte": len(cut), "replacement_s": replaced}


async def run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        for n in (2,) if args.hop_only else (1, 2):
            gw = gateway(base / f"home-{n}", n, args.src).start()
            os.environ["SAGE_LLM_HOME"] = str(base / f"home-{n}")
            try:
                await warm(s, gw.port, n)
                if args.hop_only:
                    out["direct_ms"], out["via_ms"] = await hop(s, gw.port, args.hop)
                    continue
                out[f"throughput_{n}"] = await saturate(s, gw.port, args.requests, 32)
                if n == 2:
                    out["direct_ms"], out["via_ms"] = await hop(s, gw.port, args.hop)
                    out["replicas_per_conversation"] = await conversations(s, gw.port)
                    out["kill"] = await kill_under_load(s, gw.port, 32, 2.0)
            finally:
                gw.stop()
    if not args.hop_only:
        out["ratio"] = out["throughput_2"] / out["throughput_1"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--hop", type=int, default=200)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="source tree of the gateway under test (another "
                    "checkout's src/ compares builds; default this checkout's)")
    ap.add_argument("--hop-only", action="store_true", help="only the hop (2 replicas), e.g. to alternate builds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        res = asyncio.run(run(args, Path(tmp)))
    res["machine"] = machine()
    print(f"machine: {res['machine']}; gateway from {args.src}")
    if args.hop_only:
        print(f"TTFT p50 direct / through the gateway: {res['direct_ms']:.2f} / {res['via_ms']:.2f} ms "
              f"({res['via_ms'] - res['direct_ms']:+.2f} ms)")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0
    k = res["kill"]
    print("| measure | result | goal |\n|---|---|---|")
    print(f"| throughput at c=32, 1 / 2 replicas | {res['throughput_1']:.1f} / {res['throughput_2']:.1f} req/s "
          f"(x{res['ratio']:.2f}) | >= x1.8 |")
    print(f"| TTFT p50 direct / through the gateway | {res['direct_ms']:.2f} / {res['via_ms']:.2f} ms "
          f"(+{res['via_ms'] - res['direct_ms']:.2f} ms) | <= +1 ms |")
    print(f"| replicas per 10-turn conversation (5 conversations) | {res['replicas_per_conversation']} | 1 each |")
    print(f"| replica SIGKILLed at c=32: failed before the first byte / streams cut / requests | "
          f"{k['failed_before_first_byte']} / {k['streams_cut_after_first_byte']} / {k['requests']} | 0 / - / - |")
    print(f"| two replicas serve again after the kill | {k['replacement_s']:.2f} s (load time 0.5 s) | "
          "<= load + 5 s |" if k["replacement_s"] is not None else "| replacement | not within 60 s | |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
