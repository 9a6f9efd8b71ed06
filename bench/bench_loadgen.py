#!/usr/bin/env python3
"""Benchmark of `sage-llm bench`'s load generator (sage_llm.bench.loadgen).

1. Client ceiling: requests/s at concurrency 64 against tests/fakes/fast_sse.py, a minimal asyncio SSE server in its
   own process (8 tokens per request, no delay), so the client, not the server, is what is measured. Target: >= 2,000
   req/s on the development machine. Also reports the client's CPU time per request, which does not depend on what
   else the machine is running.
2. With --engine: what the bench measures against the real CPU vLLM serving the tiny model, at concurrency 1, 4, 16
   (needs SAGE_LLM_ENGINE_DIR, like the integration tests).

  python bench/bench_loadgen.py [--runs 3] [--requests 20000] [--engine] [--port N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, free_port, machine

from sage_llm.bench import loadgen

FAST_SSE = ROOT / "tests" / "fakes" / "fast_sse.py"


def client_ceiling(port: int, runs: int, requests: int, concurrency: int, transport: str) -> dict:
    server = subprocess.Popen([sys.executable, str(FAST_SSE), str(port), "--tokens", "8"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        if server.stdout.readline().decode().strip() != f"ready {port}":
            raise SystemExit("fast_sse did not start")
        rates, cpu = [], []
        for _ in range(runs):
            cfg = loadgen.BenchConfig(base_url=f"http://127.0.0.1:{port}/v1", model="fast", concurrency=concurrency,
                                      requests=requests, prompt_tokens=16, max_tokens=8)
            c0 = time.process_time()
            doc = loadgen.run_sync(cfg, transport=transport).to_json()
            cpu.append((time.process_time() - c0) / requests * 1000)
            if doc["failed"] or not doc["server_metrics"].get("generation_tokens_match"):
                raise SystemExit(f"bad run: {doc['errors']} {doc['server_metrics']}")
            rates.append(doc["request_throughput"])
        return {"transport": transport, "concurrency": concurrency, "requests": requests, "runs": runs,
                "req_per_s_median": statistics.median(rates), "req_per_s_all": [round(r) for r in rates],
                "client_cpu_ms_per_request_median": statistics.median(cpu), "loadavg_1m": os.getloadavg()[0]}
    finally:
        server.kill()
        server.wait()


def real_engine(port: int, runs: int) -> list[dict]:
    """Start the CPU engine with the tiny model through `sage-llm start`, bench it at 1, 4, 16, stop it."""
    engine = os.environ.get("SAGE_LLM_ENGINE_DIR")
    if not engine:
        raise SystemExit("--engine needs SAGE_LLM_ENGINE_DIR (run `make engine`)")
    sys.path.insert(0, str(ROOT))  # tests/support: test-only code, not shipped in the wheel
    from tests.support.tiny import CACHE_NAME, TINY_REPO, build_tiny_model

    cache = ROOT / ".cache" / CACHE_NAME
    build_tiny_model(cache, Path(engine) / "bin" / "python", TINY_REPO)
    home = Path(tempfile.mkdtemp(prefix="bench-loadgen-"))
    env = dict(os.environ, SAGE_LLM_HOME=str(home), SAGE_LLM_VLLM=str(Path(engine) / "bin" / "vllm"),
               HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", NO_COLOR="1")
    sage = [sys.executable, "-m", "sage_llm"]
    subprocess.run([*sage, "start", TINY_REPO, "--name", "bench-tiny", "--port", str(port), "--enforce-eager"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    out = []
    try:
        for conc in (1, 4, 16):
            docs = []
            for _ in range(runs):
                r = subprocess.run([*sage, "bench", "bench-tiny", "-c", str(conc), "-n", str(max(16, conc * 4)),
                                    "--max-tokens", "16", "--prompt-tokens", "32", "--json"],
                                   env=env, capture_output=True, text=True, check=True)
                docs.append(json.loads(r.stdout))

            def med(f, docs=docs):
                return statistics.median(f(d) for d in docs)

            out.append({"concurrency": conc, "requests": docs[0]["requests"], "runs": runs,
                        "req_per_s": med(lambda d: d["request_throughput"]),
                        "output_tok_per_s": med(lambda d: d["output_throughput"]),
                        "ttft_p50_ms": med(lambda d: d["ttft_s"]["p50"]) * 1000,
                        "ttft_p99_ms": med(lambda d: d["ttft_s"]["p99"]) * 1000,
                        "itl_p50_ms": med(lambda d: d["itl_s"]["p50"] or 0) * 1000,
                        "output_tokens_per_request": docs[0]["total_output_tokens"] / max(1, docs[0]["completed"]),
                        "metrics_match": all(d["server_metrics"].get("generation_tokens_match") for d in docs),
                        "loadavg_1m": os.getloadavg()[0]})
    finally:
        subprocess.run([*sage, "stop", "--all"], env=env, check=False, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--port", type=int, default=None, help="default: a free port (bench/_common.py)")
    ap.add_argument("--engine", action="store_true", help="also bench the real CPU engine with the tiny model")
    ap.add_argument("--engine-port", type=int, default=None, help="default: a free port")
    ap.add_argument("--httpx", action="store_true", help="also measure the httpx transport (slow)")
    args = ap.parse_args()
    args.port = args.port or free_port()
    args.engine_port = args.engine_port or free_port()
    print(f"machine: {machine()}")
    res = client_ceiling(args.port, args.runs, args.requests, args.concurrency, "raw")
    print(json.dumps(res))
    verdict = "PASS" if res["req_per_s_median"] >= 2000 else "BELOW TARGET"
    print(f"client ceiling: {res['req_per_s_median']:.0f} req/s at concurrency {args.concurrency} "
          f"(target >= 2,000: {verdict}); client CPU {res['client_cpu_ms_per_request_median']:.3f} ms/request; "
          f"load average {res['loadavg_1m']:.1f}")
    if args.httpx:
        h = client_ceiling(args.port, 1, 2000, args.concurrency, "httpx")
        print(json.dumps(h))
    if args.engine:
        for row in real_engine(args.engine_port, args.runs):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
