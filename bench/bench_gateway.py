#!/usr/bin/env python3
"""The gateway's speed and memory budgets (issue 16), direct vs through the proxy, in the same run.

Setup, in a throw-away SAGE_LLM_HOME: 8 managed engines started with `sage-llm start`, each a
tests/fakes/fast_sse.py in its vLLM form (64 tokens 1 ms apart, the issue's anchor), then the proxy under test.
Engine 1 is the upstream of every load run; the 8 engines are what GET /api/local-engine/status reports.
The proxy is a command template (--proxy-cmd). By default the real `sage-llm gateway run` when this checkout has it
(in the same home, so it routes by model to the engines it finds there), else the aiohttp relay prototype
(bench/relays/relay_aiohttp.py); --gateway / --prototype force one.
Client: the `sage-llm bench` load generator (sage_llm.bench.loadgen, raw transport) in this process.

Budgets checked (direct and proxy alternate within each round; medians over the rounds):
  added TTFT p50 <= 1 ms at concurrency 1; added p50 <= 2 ms and added p99 <= 10 ms at 16
  throughput at 64 >= 50 % of direct, and >= 20x LiteLLM's (when installed: .cache/bench-venv-litellm or --litellm)
  proxy CPU <= 300 us per request and <= 15 us per proxied token: CPU(n requests of 1 token) / n is the
    per-request cost, (CPU(n of 64 tokens) - CPU(n of 1 token)) / (63 n) the per-token cost (checked at
    concurrency 16; the same split at 64 is printed too)
  GET /api/local-engine/status with 8 engines: p50 <= 2 ms (keep-alive client)
  RSS idle (ready, no request yet) <= 80 MiB; growth over --soak requests (default 10,000, concurrency 64, after the
    rounds warmed it) <= 2 MiB
CPU is read from /proc/PID/task/*/schedstat (ns) of the proxy's process tree before and after each run.

  python bench/bench_gateway.py [--rounds 5] [--soak 10000] [--gateway | --prototype | --proxy-cmd TEMPLATE]
                                [--json OUT]
Template fields: {python} {sage_llm} {relays} {port} {upstream_port} {upstream_url} {model}.
Exit status: 0 when every budget measured is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _proxy as px
from _common import BIN, machine

PROTOTYPE = "{python} {relays}/relay_aiohttp.py {port} {upstream_port}"
GATEWAY = "{sage_llm} gateway run --host 127.0.0.1 --port {port} --ttl 0"
ENGINES = 8
REQUESTS = {1: 40, 16: 320, 64: 1280}


def has_gateway() -> bool:
    """Whether this checkout's CLI has `sage-llm gateway run`."""
    r = subprocess.run([str(BIN / "sage-llm"), "gateway", "run", "--help"], capture_output=True, timeout=60)
    return r.returncode == 0


def start_engines(env: dict[str, str], n: int) -> list[tuple[str, int]]:
    """(served model, port) of n fast_sse engines started with `sage-llm start` (managed, recorded in the home)."""
    out = []
    for i in range(n):
        port, model = px.free_port(), f"bench/fast-{i + 1}"
        r = subprocess.run([str(BIN / "sage-llm"), "start", model, "--port", str(port), "--name", f"fast{i + 1}"],
                           env=env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise SystemExit(f"sage-llm start {model} failed: {r.stderr.strip()[-1000:]}")
        out.append((model, port))
    return out


def status_latency(port: int, n: int, path: str = "/api/local-engine/status") -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times: list[float] = []
    try:
        for i in range(n + 5):
            t = time.perf_counter()
            conn.request("GET", path, headers={"accept": "application/json"})
            r = conn.getresponse()
            body = r.read()
            dt = time.perf_counter() - t
            if r.status != 200:
                return {"served": False, "http_status": r.status}
            if i == 0:
                doc = json.loads(body)
            if i >= 5:
                times.append(dt * 1000)
    finally:
        conn.close()
    times.sort()
    return {"served": True, "p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))],
            "n": n, "sample": doc}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--soak", type=int, default=10000, help="requests of the memory soak (0: skip)")
    ap.add_argument("--gateway", action="store_true", help=f"run the real gateway: {GATEWAY}")
    ap.add_argument("--prototype", action="store_true", help=f"run the relay prototype: {PROTOTYPE}")
    ap.add_argument("--proxy-cmd", help=f"command template of the proxy under test (default: {PROTOTYPE})")
    ap.add_argument("--litellm", help="litellm executable (default: .cache/bench-venv-litellm/bin/litellm if there)")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the request counts (e.g. 0.25: smoke run)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    template = args.proxy_cmd or (GATEWAY if args.gateway else PROTOTYPE if args.prototype
                                  else GATEWAY if has_gateway() else PROTOTYPE)
    print(f"proxy under test: {template}", flush=True)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    env = dict(os.environ, SAGE_LLM_HOME=str(tmp / "home"), SAGE_LLM_CONFIG=str(tmp / "none.toml"), NO_COLOR="1",
               SAGE_LLM_VLLM=f"{sys.executable} {px.FAST_SSE}", FAST_SSE_TOKENS=str(px.TOKENS),
               FAST_SSE_DELAY_MS=str(px.DELAY_MS))
    for var in ("SAGE_CHAT_BASE_URL", "SAGE_CHAT_API_KEY", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    res: dict[str, Any] = {"machine": machine(), "proxy_cmd": template}
    procs: list[px.Proc] = []
    engines: list[tuple[str, int]] = []
    try:
        engines = start_engines(env, ENGINES)
        model, up_port = engines[0]
        port = px.free_port()
        cmd = shlex.split(template.format(python=sys.executable, sage_llm=BIN / "sage-llm", relays=px.RELAYS, port=port,
                                          upstream_port=up_port, upstream_url=f"http://127.0.0.1:{up_port}/v1",
                                          model=model))
        proxy = px.Proc("proxy", cmd, port, env=env)
        procs.append(proxy.start())
        res["rss_idle_mib"] = proxy.rss_mib()

        def n_for(c: int) -> int:
            return max(c, int(REQUESTS[c] * args.scale))

        px.measure(port, model, 16, n_for(16), up_port, proxy)  # warm-up (and the route exists)
        rows = []
        for rnd in range(args.rounds):
            for c in (1, 16, 64):
                pair = [("direct", up_port), ("proxy", port)]
                for t, p in pair if rnd % 2 == 0 else pair[::-1]:
                    r = px.measure(p, model, c, n_for(c), up_port, proxy if t == "proxy" else None)
                    r.update(target=t, round=rnd, loadavg_1m=os.getloadavg()[0])
                    rows.append(r)
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}),
                          flush=True)
        res["rows"] = rows

        def added(c: int, key: str) -> float:
            d = {r["round"]: r for r in rows if r["target"] == "direct" and r["concurrency"] == c}
            return statistics.median(r[key] - d[r["round"]][key] for r in rows
                                     if r["target"] == "proxy" and r["concurrency"] == c)

        def medof(t: str, c: int, key: str) -> float:
            return statistics.median(r[key] for r in rows if r["target"] == t and r["concurrency"] == c)

        res["ttft"] = {c: {"direct_p50_ms": medof("direct", c, "ttft_p50_ms"),
                           "proxy_p50_ms": medof("proxy", c, "ttft_p50_ms"),
                           "added_p50_ms": added(c, "ttft_p50_ms"), "added_p99_ms": added(c, "ttft_p99_ms")}
                       for c in (1, 16, 64)}
        d64 = {r["round"]: r for r in rows if r["target"] == "direct" and r["concurrency"] == 64}
        res["throughput_64"] = {
            "direct_req_s": medof("direct", 64, "req_per_s"), "proxy_req_s": medof("proxy", 64, "req_per_s"),
            "proxy_tok_s": medof("proxy", 64, "tok_per_s"), "direct_tok_s": medof("direct", 64, "tok_per_s"),
            "ratio": statistics.median(r["req_per_s"] / d64[r["round"]]["req_per_s"] for r in rows
                                       if r["target"] == "proxy" and r["concurrency"] == 64)}

        # CPU: fixed cost per request (1-token requests) and marginal cost per token (64 - 1 tokens), alternated
        res["cpu"] = px.cpu_split(proxy, model, up_port, 16, n_for(16))
        # the same at 64, for the record: more tokens share one read there, so a token costs less
        res["cpu_64"] = px.cpu_split(proxy, model, up_port, 64, n_for(64) // 2)
        print(json.dumps({"cpu_64": res["cpu_64"]}), flush=True)
        print(json.dumps({"cpu": res["cpu"]}), flush=True)

        st = status_latency(port, 200)
        res["status_endpoint"] = {k: v for k, v in st.items() if k != "sample"}
        if st.get("served"):
            res["status_endpoint"]["engines_in_answer"] = _count_engines(st["sample"])
        print(json.dumps({"status_endpoint": res["status_endpoint"]}), flush=True)
        full = status_latency(port, 50, "/api/status")  # the full status document (no budget; for the record)
        res["full_status_endpoint"] = {k: v for k, v in full.items() if k != "sample"}
        if full.get("served"):
            res["full_status_endpoint"]["engines_in_answer"] = _count_engines(full["sample"])
        print(json.dumps({"full_status_endpoint": res["full_status_endpoint"]}), flush=True)

        binary = None if args.no_litellm else px.litellm_bin(args.litellm)
        res["litellm_skipped"] = "--no-litellm" if args.no_litellm else None if binary else \
            f"LiteLLM not installed ({args.litellm or px.LITELLM_VENV})"
        if binary:
            ll = px.litellm(binary, up_port, model, tmp, port=px.free_port())
            procs.append(ll.start())
            px.measure(ll.port, model, 16, 32, up_port, ll)
            r = px.measure(ll.port, model, 64, max(64, int(128 * args.scale)), up_port, ll)
            res["litellm_64"] = {"req_s": r["req_per_s"], "tok_s": r["tok_per_s"], "ttft_p50_ms": r["ttft_p50_ms"],
                                 "rss_mib": ll.rss_mib(), "version": px.LITELLM_VERSION}
            ll.stop()
            print(json.dumps({"litellm_64": res["litellm_64"]}), flush=True)

        if args.soak:
            before = proxy.rss_mib()
            half = args.soak // 2
            px.measure(port, model, 64, half, up_port, proxy)
            mid = proxy.rss_mib()
            px.measure(port, model, 64, args.soak - half, up_port, proxy)
            after = proxy.rss_mib()
            res["soak"] = {"requests": args.soak, "rss_before_mib": before, "rss_half_mib": mid,
                           "rss_after_mib": after, "growth_mib": after - before}
            print(json.dumps({"soak": res["soak"]}), flush=True)
        res["loadavg_1m"] = [min(r["loadavg_1m"] for r in rows), max(r["loadavg_1m"] for r in rows)]
    finally:
        for p in procs:
            p.stop()
        if engines:
            subprocess.run([str(BIN / "sage-llm"), "stop", "--all"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    verdicts = budgets(res)
    res["budgets"] = verdicts
    print()
    for name, (value, ok) in verdicts.items():
        print(f"{'PASS' if ok else 'FAIL' if ok is not None else 'n/a '}  {name}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0 if all(ok is not False for _, ok in verdicts.values()) else 1


def _count_engines(doc: Any) -> int | None:
    """Engines in a status answer: LocalEngineStatus is about the local engine, the full document lists them."""
    if isinstance(doc, dict):
        for key in ("engines", "instances"):
            if isinstance(doc.get(key), list):
                return len(doc[key])
    return None


def budgets(res: dict[str, Any]) -> dict[str, tuple[str, bool | None]]:
    t, tp, cpu = res["ttft"], res["throughput_64"], res["cpu"]
    out: dict[str, tuple[str, bool | None]] = {
        "added TTFT p50 at c=1 <= 1 ms": (f"{t[1]['added_p50_ms']:+.2f} ms", t[1]["added_p50_ms"] <= 1.0),
        "added TTFT p50 at c=16 <= 2 ms": (f"{t[16]['added_p50_ms']:+.2f} ms", t[16]["added_p50_ms"] <= 2.0),
        "added TTFT p99 at c=16 <= 10 ms": (f"{t[16]['added_p99_ms']:+.2f} ms", t[16]["added_p99_ms"] <= 10.0),
        "throughput at c=64 >= 50 % of direct": (
            f"{tp['proxy_req_s']:.0f} vs {tp['direct_req_s']:.0f} req/s = {100 * tp['ratio']:.0f} %",
            tp["ratio"] >= 0.5),
        "CPU <= 300 us per request": (f"{cpu['us_per_request']:.0f} us", cpu["us_per_request"] <= 300),
        "CPU <= 15 us per proxied token": (f"{cpu['us_per_token']:.1f} us", cpu["us_per_token"] <= 15),
        "RSS idle <= 80 MiB": (f"{res['rss_idle_mib']:.1f} MiB", res["rss_idle_mib"] <= 80),
    }
    ll = res.get("litellm_64")
    out["throughput at c=64 >= 20x LiteLLM"] = (
        (f"{tp['proxy_req_s'] / ll['req_s']:.1f}x ({ll['req_s']:.1f} req/s)", tp["proxy_req_s"] >= 20 * ll["req_s"])
        if ll else (f"not measured: {res.get('litellm_skipped')}", None))
    st = res.get("status_endpoint", {})
    out["GET /api/local-engine/status, 8 engines, p50 <= 2 ms"] = (
        (f"{st['p50_ms']:.2f} ms (p99 {st['p99_ms']:.2f})", st["p50_ms"] <= 2.0) if st.get("served")
        else (f"not served (HTTP {st.get('http_status')})", None))
    soak = res.get("soak")
    out[f"RSS growth over {soak['requests'] if soak else 0} requests <= 2 MiB"] = (
        (f"{soak['growth_mib']:+.1f} MiB ({soak['rss_before_mib']:.1f} -> {soak['rss_after_mib']:.1f})",
         soak["growth_mib"] <= 2.0) if soak else ("skipped", None))
    return out


if __name__ == "__main__":
    sys.exit(main())
