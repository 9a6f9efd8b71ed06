#!/usr/bin/env python3
"""Fair share under load, and the cost of the shared mode (issue 22), side by side in one run.

Fairness: a fake vLLM (tests/fakes/fake_vllm.py) of fixed capacity (--max-num-seqs 4; 32 tokens 10 ms apart, so
0.32 s a request and a slot frees every 0.08 s on average) behind a gateway that routes one model to it
(--upstream). Key B sends one streamed request at a time; its TTFT (time to the first content token) is measured
  1. with A idle (through this checkout's gateway, keyed),
  2. with A flooding at concurrency 64 through the baseline gateway (first come, first served: the source tree given
     by --baseline-src, default /work/main/src, run with PYTHONPATH),
  3. with A flooding through this checkout's gateway (keys A and B: fair admission).
and the engine's occupancy (vLLM's num_requests_running gauge / capacity, sampled every 50 ms) while A floods.
Goal: B's TTFT p50 in 3 <= its value in 1 + service time / capacity (0.08 s), occupancy ~100 % (work-conserving).

Cost: the same gateway with 100 keys defined (and accounting on) against no keys, the engine unlimited and instant
(no token delay): gateway CPU per request (its process tree, /proc schedstat) at concurrency 16, and TTFT p50 at
concurrency 1. Alternating, medians over --rounds.

  python bench/bench_fairness.py [--rounds 3] [--b-requests 6] [--baseline-src /work/main/src] [--src SRC]
                                 [--cost-only] [--client-usage] [--json OUT]
Everything listens on 127.0.0.1. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets as secrets_mod
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

MODEL = "bench/fair"
CAPACITY = 4
TOKENS = 32
DELAY_S = 0.01
FLOOD = 64


def engine(port: int, capacity: int | None, delay: float) -> px.Proc:
    env = {**os.environ, "FAKE_VLLM_LOAD_S": "0", "FAKE_VLLM_TOKEN_DELAY_S": str(delay),
           "FAKE_VLLM_REPLY": " ".join(["tok"] * TOKENS)}
    cmd = [sys.executable, str(FAKE_VLLM), "serve", MODEL, "--host", "127.0.0.1", "--port", str(port)]
    if capacity:
        cmd += ["--max-num-seqs", str(capacity)]
    return px.Proc(f"engine-{port}", cmd, port, env=env)


def gateway(name: str, src: Path, home: Path, upstream: int, keys: int = 0, capacity: int | None = CAPACITY
            ) -> tuple[px.Proc, dict[str, str]]:
    """A gateway process (`python -m sage_llm.gateway --options JSON`) from source tree `src`; keys: how many keys
    to define in its state directory (0: the open loopback mode); capacity: the engine's --max-num-seqs, told to the
    gateway in the model's profile. Returns it and the secrets by key name."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "llm.toml"
    config.write_text(f'[gateway.models."{MODEL}"]\nargs = ["--max-num-seqs", "{capacity}"]\n' if capacity else "")
    env = {**os.environ, "PYTHONPATH": str(src), "SAGE_LLM_HOME": str(home), "SAGE_LLM_CONFIG": str(config)}
    secrets: dict[str, str] = {}
    if keys:
        old = os.environ.get("SAGE_LLM_HOME")
        os.environ["SAGE_LLM_HOME"] = str(home)
        try:
            from sage_llm.gateway import keys as keyfile

            for i in range(keys):
                name_ = ("A", "B")[i] if i < 2 else f"user{i:03d}"
                secrets[name_] = keyfile.add(name_)[1]
        finally:
            if old is None:
                os.environ.pop("SAGE_LLM_HOME", None)
            else:
                os.environ["SAGE_LLM_HOME"] = old
    port = free_port()
    opts = {"host": "127.0.0.1", "port": port, "ttl": 0, "external": False, "fallback": False,
            "upstreams": {MODEL: f"http://127.0.0.1:{upstream}/v1"}}
    cmd = [sys.executable, "-m", "sage_llm.gateway", "--options", json.dumps(opts)]
    return px.Proc(name, cmd, port, env=env, cwd=home), secrets


CONTENT = re.compile(rb'"content": ?"tok')  # the fake's own spacing, or LiteLLM's re-encoded chunks
CLIENT_USAGE: dict[str, Any] = {}  # --client-usage: every client asks for the usage chunk itself


async def ttft(session: aiohttp.ClientSession, port: int, key: str | None) -> float:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}], **CLIENT_USAGE}
    t0 = time.perf_counter()
    first = None
    async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status} from port {port}: {(await r.text())[:300]}")
        async for chunk in r.content.iter_any():
            if first is None and CONTENT.search(chunk):
                first = time.perf_counter() - t0
    assert first is not None, "no content token in the stream"
    return first


async def occupancy(port: int, stop: asyncio.Event, out: list[float]) -> None:
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("vllm:num_requests_running{"):
                        out.append(float(line.rsplit(" ", 1)[1]) / CAPACITY)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)


async def fairness_run(gw_port: int, engine_port: int, a: str | None, b: str | None, flood: bool, n_b: int
                       ) -> tuple[list[float], float | None]:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        stop = asyncio.Event()
        workers: list[asyncio.Task[Any]] = []
        occ: list[float] = []

        async def flooder() -> None:
            while not stop.is_set():
                await ttft(s, gw_port, a)

        if flood:
            workers = [asyncio.ensure_future(flooder()) for _ in range(FLOOD)]
            await asyncio.sleep(1.0)  # A's backlog builds up
            workers.append(asyncio.ensure_future(occupancy(engine_port, stop, occ)))
        times = [await ttft(s, gw_port, b) for _ in range(n_b)]
        stop.set()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return times, (statistics.mean(occ) if occ else None)


async def cost_run(gw: px.Proc, key: str | None, concurrency: int, n: int) -> tuple[float, float]:
    """(gateway CPU seconds per request at `concurrency`, TTFT p50 at concurrency 1)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for _ in range(20):
            await ttft(s, gw.port, key)  # warm: connections, the key ring, the usage file
        before = gw.cpu_s()
        per = n // concurrency

        async def worker() -> None:
            for _ in range(per):
                await ttft(s, gw.port, key)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu = gw.cpu_delta(before) / (per * concurrency)
        t1 = [await ttft(s, gw.port, key) for _ in range(100)]
    return cpu, statistics.median(t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--b-requests", type=int, default=6)
    ap.add_argument("--cost-requests", type=int, default=800)
    ap.add_argument("--baseline-src", default="/work/main/src")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--cost-only", action="store_true", help="skip the fairness runs")
    ap.add_argument("--litellm", nargs="?", const="", default=None, metavar="BIN",
                    help="cost part: LiteLLM's proxy with a master key too, side by side (its virtual keys need a "
                    "database LiteLLM reaches through prisma, not installed here); BIN defaults to "
                    f"{px.LITELLM_VENV}/bin/litellm")
    ap.add_argument("--litellm-requests", type=int, default=160, help="LiteLLM's CPU run (it serves ~15 req/s)")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="source tree of the gateways under test (another "
                    "checkout's src/ compares builds; default this checkout's)")
    ap.add_argument("--client-usage", action="store_true", help="clients ask for stream usage themselves (both "
                    "gateways then relay the same frames: isolates what the extra usage frame costs)")
    args = ap.parse_args()
    if args.client_usage:
        CLIENT_USAGE["stream_options"] = {"include_usage": True}
    src = args.src
    base = Path(args.baseline_src)
    if not (base / "sage_llm" / "gateway" / "server.py").exists():
        raise SystemExit(f"--baseline-src {base} has no sage_llm gateway")
    work = Path(tempfile.mkdtemp(prefix="bench-fair-"))
    procs: list[px.Proc] = []
    res: dict[str, Any] = {"machine": machine(), "capacity": CAPACITY, "tokens": TOKENS, "delay_s": DELAY_S,
                           "flood": FLOOD, "rounds": []}
    try:
        e_port = free_port()
        procs.append(engine(e_port, CAPACITY, DELAY_S).start())
        fcfs, _ = gateway("baseline", base, work / "baseline", e_port)
        fair, secrets = gateway("fair", src, work / "fair", e_port, keys=2)
        procs += [fcfs.start(), fair.start()]
        for r in range(0 if args.cost_only else args.rounds):
            idle, _ = asyncio.run(fairness_run(fair.port, e_port, None, secrets["B"], False, args.b_requests))
            main_, occ_main = asyncio.run(fairness_run(fcfs.port, e_port, None, None, True, args.b_requests))
            ours, occ_ours = asyncio.run(fairness_run(fair.port, e_port, secrets["A"], secrets["B"], True,
                                                      args.b_requests))
            row = {"idle": statistics.median(idle), "baseline": statistics.median(main_),
                   "fair": statistics.median(ours), "occ_baseline": occ_main, "occ_fair": occ_ours}
            res["rounds"].append(row)
            print(f"round {r + 1}: B TTFT p50 idle {row['idle'] * 1000:.0f} ms | A flooding, baseline (FCFS) "
                  f"{row['baseline'] * 1000:.0f} ms, fair {row['fair'] * 1000:.0f} ms | occupancy baseline "
                  f"{(occ_main or 0) * 100:.0f} %, fair {(occ_ours or 0) * 100:.0f} %", flush=True)
        # cost of the shared mode: same engine kind, unlimited and instant
        c_port = free_port()
        procs.append(engine(c_port, None, 0.0).start())
        open_gw, _ = gateway("open", src, work / "open", c_port, capacity=None)
        keyed_gw, secrets100 = gateway("keyed", src, work / "keyed", c_port, keys=100, capacity=None)
        procs += [open_gw.start(), keyed_gw.start()]
        cost: dict[str, list[tuple[float, float]]] = {"open": [], "keyed": []}
        ll: px.Proc | None = None
        master = "sk-" + secrets_mod.token_urlsafe(24)
        if args.litellm is not None:
            binary = px.litellm_bin(args.litellm or None)
            if binary is None:
                raise SystemExit(f"--litellm: no LiteLLM at {args.litellm or px.LITELLM_VENV}")
            ll = px.litellm(binary, c_port, MODEL, work, port=free_port(), master_key=master)
            procs.append(ll.start())
            cost["litellm"] = []
        for _ in range(args.rounds):
            cost["open"].append(asyncio.run(cost_run(open_gw, None, 16, args.cost_requests)))
            cost["keyed"].append(asyncio.run(cost_run(keyed_gw, secrets100["user050"], 16, args.cost_requests)))
            if ll is not None:
                cost["litellm"].append(asyncio.run(cost_run(ll, master, 16, args.litellm_requests)))
    finally:
        for p in reversed(procs):
            p.stop()
    rounds = res["rounds"] or [dict.fromkeys(("idle", "baseline", "fair", "occ_baseline", "occ_fair"), 0.0)]
    med = {k: statistics.median(x[k] for x in rounds) for k in ("idle", "baseline", "fair")}
    occ = {k: statistics.median(x[k] or 0 for x in rounds) for k in ("occ_baseline", "occ_fair")}
    cpu = {k: statistics.median(c[0] for c in v) for k, v in cost.items()}
    t1 = {k: statistics.median(c[1] for c in v) for k, v in cost.items()}
    res.update({"median": med, "occupancy": occ, "cpu_per_request_s": cpu, "ttft_c1_s": t1})
    slot = TOKENS * DELAY_S / CAPACITY
    print(f"\nMachine: {res['machine']}; engine: fake vLLM, capacity {CAPACITY}, {TOKENS} tokens {DELAY_S * 1000:.0f} "
          f"ms apart; A floods at c={FLOOD}; medians of {args.rounds} rounds x {args.b_requests} B requests.\n")
    print("| B's TTFT p50 | A idle | A flooding, baseline (FCFS) | A flooding, fair share | goal |")
    print("|---|---|---|---|---|")
    print(f"| | {med['idle'] * 1000:.0f} ms | {med['baseline'] * 1000:.0f} ms | {med['fair'] * 1000:.0f} ms | "
          f"<= {(med['idle'] + slot) * 1000:.0f} ms |")
    print(f"| engine occupancy while A floods | | {occ['occ_baseline'] * 100:.0f} % | {occ['occ_fair'] * 100:.0f} % "
          f"| ~100 % |\n")
    print("| shared-mode cost (c=16 CPU, c=1 TTFT) | no keys | 100 keys + accounting | change |")
    print("|---|---|---|---|")
    print(f"| gateway CPU per request | {cpu['open'] * 1e6:.0f} us | {cpu['keyed'] * 1e6:.0f} us | "
          f"{(cpu['keyed'] / cpu['open'] - 1) * 100:+.1f} % |")
    print(f"| TTFT p50 at c=1 | {t1['open'] * 1000:.2f} ms | {t1['keyed'] * 1000:.2f} ms | "
          f"{(t1['keyed'] - t1['open']) * 1000:+.2f} ms |")
    if "litellm" in cpu:
        print(f"\nLiteLLM (master key), same engine, same run: CPU per request {cpu['litellm'] * 1e6:.0f} us "
              f"({cpu['litellm'] / cpu['keyed']:.1f}x this gateway with 100 keys); TTFT p50 at c=1 "
              f"{t1['litellm'] * 1000:.2f} ms ({(t1['litellm'] - t1['keyed']) * 1000:+.2f} ms against it: the same "
              "engine behind one hop each)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    ok = med["fair"] <= med["idle"] + slot and occ["occ_fair"] >= 0.9
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
