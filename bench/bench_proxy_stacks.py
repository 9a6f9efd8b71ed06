#!/usr/bin/env python3
"""Which HTTP server + client for `sage-llm gateway` (issue 16): minimal streaming relays of each stack, measured
against the same upstream, directly and through each relay, in the same run.

Upstream: tests/fakes/fast_sse.py, 64 tokens 1 ms apart (the issue's anchor). Relays (bench/relays/, each a small
script that forwards any request and relays the response body as raw bytes, no SSE parsing):
  aiohttp          aiohttp web server + aiohttp ClientSession (iter_any)
  aiohttp-uvloop   the same on uvloop
  starlette        uvicorn (httptools + uvloop, its "auto" when installed) + Starlette + httpx.AsyncClient (aiter_raw)
  starlette-h11    the same on uvicorn's pure-Python h11 and the asyncio loop
  starlette-aiohttp  uvicorn + Starlette with an aiohttp ClientSession as the client (server vs client cost)
  asyncio          raw asyncio server + raw pooled asyncio client (the floor for Python; not shippable as is)
  litellm          LiteLLM's proxy (litellm[proxy]==1.106.12, one worker, no master key, local cost map), when
                   installed in .cache/bench-venv-litellm (or --litellm PATH); bench-only, never a dependency
Client: the `sage-llm bench` load generator (sage_llm.bench.loadgen, raw transport) here, at concurrency 1, 16
and 64. Each round runs every target at each concurrency, the order rotated every round; figures are medians over
the rounds, and ratios against direct are taken within a round. The relay's CPU (its process tree's threads)
is read before and after each run (schedstat, ns); RSS when idle (started, no request yet) and after all runs.
--cpu-split adds each relay's CPU as a fixed cost per request plus a marginal cost per token. Every run checks that
the upstream's token counter grew by exactly the tokens the client received.

  python bench/bench_proxy_stacks.py [--rounds 3] [--stacks aiohttp,starlette,asyncio,litellm] [--cpu-split]
                                     [--json OUT]

Needs aiohttp, uvicorn[standard] and starlette in the venv (bench-only: `.venv/bin/pip install aiohttp
'uvicorn[standard]' starlette`); LiteLLM: `python3 -m venv .cache/bench-venv-litellm &&
.cache/bench-venv-litellm/bin/pip install 'litellm[proxy]==1.106.12'`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _proxy as px
from _common import machine

MODEL = "fast"
REQUESTS = {1: 30, 16: 320, 64: 1280}
LITELLM_REQUESTS = {1: 20, 16: 48, 64: 192}  # it saturates at 13-15 req/s: keep its runs to seconds


def summarize(rows: list[dict[str, Any]], targets: list[str], concs: list[int]) -> list[dict[str, Any]]:
    out = []
    for c in concs:
        direct = {r["round"]: r for r in rows if r["target"] == "direct" and r["concurrency"] == c}
        for t in targets:
            mine = [r for r in rows if r["target"] == t and r["concurrency"] == c]
            s: dict[str, Any] = {"target": t, "concurrency": c, "runs": len(mine)}
            for k in ("ttft_p50_ms", "ttft_p99_ms", "req_per_s", "tok_per_s", "cpu_us_per_request",
                      "cpu_us_per_token"):
                s[k] = px.med(mine, k)
            if t != "direct":
                s["added_ttft_p50_ms"] = px.med([{"v": r["ttft_p50_ms"] - direct[r["round"]]["ttft_p50_ms"]}
                                                 for r in mine if r["round"] in direct], "v")
                s["added_ttft_p99_ms"] = px.med([{"v": r["ttft_p99_ms"] - direct[r["round"]]["ttft_p99_ms"]}
                                                 for r in mine if r["round"] in direct], "v")
                s["throughput_vs_direct"] = px.med([{"v": r["req_per_s"] / direct[r["round"]]["req_per_s"]}
                                                    for r in mine if r["round"] in direct], "v")
            out.append(s)
    return out


def table(summary: list[dict[str, Any]], mem: dict[str, dict[str, float]]) -> str:
    f = px.fmt
    lines = ["| stack | c | TTFT p50 ms (added) | TTFT p99 ms (added) | req/s (vs direct) | tokens/s | "
             "CPU us/request | CPU us/token |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        d = s["target"] == "direct"
        lines.append(
            f"| {s['target']} | {s['concurrency']} | {f(s['ttft_p50_ms'], '{:.2f}')}"
            f"{'' if d else ' (+' + f(s['added_ttft_p50_ms'], '{:.2f}') + ')'} | {f(s['ttft_p99_ms'], '{:.2f}')}"
            f"{'' if d else ' (+' + f(s['added_ttft_p99_ms'], '{:.2f}') + ')'} | {f(s['req_per_s'], '{:.0f}')}"
            f"{'' if d else ' (' + f(100 * s['throughput_vs_direct'], '{:.0f}') + ' %)'} | "
            f"{f(s['tok_per_s'], '{:,.0f}')} | {f(s.get('cpu_us_per_request'), '{:.0f}')} | "
            f"{f(s.get('cpu_us_per_token'), '{:.1f}')} |")
    lines += ["", "| stack | RSS idle MiB | RSS after MiB | requests served |", "|---|---|---|---|"]
    for t, m in mem.items():
        lines.append(f"| {t} | {m['idle']:.1f} | {m['after']:.1f} | {m['requests']} |")
    return "\n".join(lines).replace("(+-", "(-")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stacks", default="aiohttp,starlette,asyncio,litellm",
                    help="comma list of: aiohttp, aiohttp-uvloop, starlette, starlette-h11, starlette-aiohttp, "
                         "asyncio, asyncio-uvloop, litellm")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--litellm", help="path of the litellm executable (default: .cache/bench-venv-litellm)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the request counts (e.g. 0.25 for a smoke run)")
    ap.add_argument("--json", help="write every run and the summary here")
    ap.add_argument("--cpu-split", action="store_true",
                    help="also split each relay's CPU into a cost per request and a cost per token (1- vs 64-token "
                         "requests at concurrency 16)")
    args = ap.parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    stacks = [s for s in args.stacks.split(",") if s]
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    procs: dict[str, px.Proc] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-stacks-"))
    upstream = px.start_upstream()
    try:
        for s in stacks:
            if s == "litellm":
                binary = px.litellm_bin(args.litellm)
                if binary is None:
                    print("litellm: not installed (see the docstring); skipped", flush=True)
                    continue
                procs[s] = px.litellm(binary, upstream.port, MODEL, tmp).start()
            else:
                procs[s] = px.relay(s, upstream.port).start()
        targets = ["direct", *procs]
        ports = {"direct": upstream.port, **{k: p.port for k, p in procs.items()}}
        mem = {k: {"idle": p.rss_mib(), "after": 0.0, "requests": 0} for k, p in procs.items()}

        def n_for(t: str, c: int) -> int:
            table_ = LITELLM_REQUESTS if t == "litellm" else REQUESTS
            return max(c, int(table_.get(c, c * 20) * args.scale))

        for t in targets:  # warm-up: connections, caches, lazy imports
            px.measure(ports[t], MODEL, 16, n_for(t, 16) // 2 or 16, upstream.port, procs.get(t))
            if t in mem:
                mem[t]["requests"] += n_for(t, 16) // 2 or 16
        rows = []
        for rnd in range(args.rounds):
            for c in concs:
                order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                for t in order:
                    n = n_for(t, c)
                    r = px.measure(ports[t], MODEL, c, n, upstream.port, procs.get(t))
                    r.update(target=t, round=rnd, loadavg_1m=os.getloadavg()[0])
                    rows.append(r)
                    if t in mem:
                        mem[t]["requests"] += n
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}),
                          flush=True)
        split = {}
        if args.cpu_split:  # fixed CPU per request + marginal CPU per token, relays only (LiteLLM: too slow)
            for k, p in procs.items():
                if k != "litellm":
                    split[k] = px.cpu_split(p, MODEL, upstream.port, 16, n_for(k, 16))
                    mem[k]["requests"] += 6 * n_for(k, 16)
                    print(json.dumps({"cpu_split": k, **split[k]}), flush=True)
        for k, p in procs.items():
            mem[k]["after"] = p.rss_mib()
        summary = summarize(rows, targets, concs)
        loads = [r["loadavg_1m"] for r in rows]
        print(f"\nmedian of {args.rounds} rounds; load average {min(loads):.1f}-{max(loads):.1f} during the runs\n")
        print(table(summary, mem))
        if split:
            print("\n| stack | CPU per request (1 token) | CPU per extra token | CPU per 64-token request |\n"
                  "|---|---|---|---|")
            for k, c in split.items():
                print(f"| {k} | {c['us_per_request']:.0f} us | {c['us_per_token']:.1f} us | "
                      f"{c['us_per_request_of_64_tokens']:.0f} us |")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows, "summary": summary,
                                                   "memory": mem, "cpu_split": split}, indent=1))
    finally:
        for p in procs.values():
            p.stop()
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
