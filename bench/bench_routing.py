"""Routing across two replicas: vllm-router (PyPI 0.1.17, Rust) against the gateway's own policy
(sage_llm.gateway.balance, in the relay harness bench/relays/relay_balance.py), in front of two real CPU vLLM
engines of the tiny model with prefix caching, measured in the same run:

- added TTFT: c=1 streamed chat requests, the paths interleaved request by request (direct, then each router), so
  that load from elsewhere on the machine falls on all of them alike; p50 over direct. Twice: in front of two fast
  fake upstreams (the hop alone), and in front of real engine A alone (every router configured with that one
  worker, so that no path wins by picking the less loaded engine);
- CPU per request of each router process (its whole process tree, schedstat), over the interleaved window, and its
  idle CPU (health checks and the like) over a quiet few seconds;
- prefix-cache hit rate: K conversations x 10 turns (turn t of every conversation, then turn t+1; K odd, so that
  round robin does not pin a conversation by accident), each turn resending the whole history; vLLM's
  `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` (tokens) of both engines, read from /metrics
  before and after. Every scenario's conversations start with their own nonce, so one scenario never hits the cache
  entries of another.
- the cost of balance.choose itself (microseconds per call, this process);
- as the reference for the hop, the gateway of this checkout (`sage-llm gateway run --upstream MODEL=URL`, one
  static route to the first fake upstream): the hop every request pays today, routers or not.

Public tools only: the engines are started and stopped with the `sage-llm` CLI (a private SAGE_LLM_HOME), vllm-router
with its own console script from a throw-away venv (not the project's):

  python3 -m venv /tmp/vr && /tmp/vr/bin/pip download --no-deps vllm-router==0.1.17 -d /tmp/vr/dl
  /tmp/vr/bin/pip install /tmp/vr/dl/vllm_router-*.whl setproctitle aiohttp orjson uvicorn fastapi requests

Usage: SAGE_LLM_ENGINE_DIR=.engines/cpu .venv/bin/python bench/bench_routing.py --vllm-router /tmp/vr/bin/vllm-router
       [--requests 40] [--conversations 5] [--turns 10] [--engines PORT_A,PORT_B (engines already running)]
Everything listens on 127.0.0.1; every process started here is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, free_port, machine
from _proxy import FAST_SSE, RELAYS, Proc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test support package (tests/support), not shipped in the wheel
from tests.support.tiny import CACHE_NAME, TINY_REPO, build_tiny_model  # noqa: E402

from sage_llm.gateway import balance  # noqa: E402

TINY_CACHE = ROOT / ".cache" / CACHE_NAME
MAX_TOKENS = 8
# a user turn of about 80 tokens of the tiny model's tokenizer: 10 turns and their replies stay under its 1024
WORDS = ("routing replicas prefix cache affinity conversation engine gateway cluster node request token "
         "stream latency memory").split()


# ----------------------------------------------------------------------------------------------------- client
_SOCKS: dict[int, socket.socket] = {}


def _post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[http.client.HTTPResponse, float]:
    """POST on a kept-alive connection per port (as a real client and every router keep theirs), the head and the
    body in one write with TCP_NODELAY (http.client writes them apart: a wait on Nagle and delayed ACKs, or an
    extra wake-up of the server, that no router pays on its own upstream connection). Returns the response (head
    read) and the time the request was written; a kept-alive connection the server closed meanwhile is opened
    again, untimed."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    raw = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body
    for attempt in (1, 2):
        sock = _SOCKS.get(port)
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=300)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _SOCKS[port] = sock
        t0 = time.perf_counter()
        try:
            sock.sendall(raw)
            r = http.client.HTTPResponse(sock, method="POST")
            r.begin()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            sock.close()
            _SOCKS.pop(port, None)
            if attempt == 2:
                raise
            continue
        if r.will_close:
            _SOCKS.pop(port, None)
        return r, t0
    raise AssertionError("unreachable")


def chat(port: int, messages: list[dict[str, str]], headers: dict[str, str] | None = None
         ) -> tuple[float, str, str | None]:
    """One streamed chat request: TTFT (first `data:` event) in seconds, the reply's text, and the replica named in
    `x-sage-llm-engine` (when the router names it)."""
    body = json.dumps({"model": TINY_REPO, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True,
                       "temperature": 0}).encode()
    r, t0 = _post(port, "/v1/chat/completions", body, headers or {})
    if r.status != 200:
        raise SystemExit(f"port {port}: HTTP {r.status}: {r.read()[:300]!r}")
    first: float | None = None
    text: list[str] = []
    while True:
        raw = r.readline()
        if not raw:
            break
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        if first is None:
            first = time.perf_counter() - t0
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        for choice in json.loads(payload).get("choices", []):
            text.append((choice.get("delta") or {}).get("content") or "")
    r.read()  # the end of the chunked body: the connection is ready for the next request
    if first is None:
        raise SystemExit(f"port {port}: a stream without any event")
    return first, "".join(text), r.getheader("x-sage-llm-engine")


def http_get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def cache_counters(port: int) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache, in tokens, from its /metrics (vLLM 0.32's names)."""
    hits = queries = 0.0
    for line in http_get(port, "/metrics").decode().splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


# ---------------------------------------------------------------------------------------------------- engines
class Engines:
    """Two real CPU vLLM engines of the tiny model (prefix caching on), started and stopped with `sage-llm`."""

    def __init__(self, engine_dir: Path) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="bench-routing-"))
        self.env = {**os.environ, "SAGE_LLM_HOME": str(self.home), "SAGE_LLM_VLLM": str(engine_dir / "bin" / "vllm"),
                    "HF_HUB_CACHE": str(TINY_CACHE), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
        self.names: list[str] = []
        self.ports: list[int] = []

    def start(self, n: int = 2) -> list[int]:
        procs = []
        for i in range(n):
            name, port = f"route-{'ab'[i]}", free_port()
            self.names.append(name)
            self.ports.append(port)
            procs.append(subprocess.Popen(
                [str(BIN / "sage-llm"), "start", TINY_REPO, "--name", name, "--port", str(port), "--enforce-eager",
                 "--json", "--timeout", "900", "--", "--enable-prefix-caching"],
                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for name, p in zip(self.names, procs, strict=True):
            out, err = p.communicate(timeout=960)
            if p.returncode != 0:
                raise SystemExit(f"engine {name} did not start (exit {p.returncode}): {err.strip()[-600:]}")
            print(f"engine {name}: ready after {json.loads(out)['ready_after_s']:.1f} s")
        return self.ports

    def stop(self) -> None:
        for name in self.names:
            subprocess.run([str(BIN / "sage-llm"), "stop", name], env=self.env, capture_output=True, timeout=180,
                           check=False)
        shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- routers
def vllm_router(binary: Path, ports: list[int], policy: str) -> Proc:
    port = free_port()
    return Proc(f"vllm-router-{policy}", [str(binary), "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
                                          *[f"http://127.0.0.1:{p}" for p in ports], "--policy", policy,
                                          "--log-level", "warning", "--prometheus-host", "127.0.0.1",
                                          "--prometheus-port", str(free_port())], port, ready_timeout=120.0)


def balance_relay(ports: list[int], policy: str) -> Proc:
    port = free_port()
    ups = [a for p in ports for a in ("--upstream", str(p))]
    return Proc(f"balance-{policy}", [sys.executable, str(RELAYS / "relay_balance.py"), str(port), *ups,
                                      "--policy", policy], port)


# ------------------------------------------------------------------------------------------------ measurements
def start_routers(binary: Path, ports: list[int]) -> dict[str, Proc]:
    routers: dict[str, Proc] = {}
    try:
        for policy in ("cache_aware", "round_robin"):
            routers[f"vllm-router {policy}"] = vllm_router(binary, ports, policy).start()
        for policy in ("affinity", "round_robin"):
            routers[f"balance {policy}"] = balance_relay(ports, policy).start()
    except BaseException:
        for proc in routers.values():
            proc.stop()
        raise
    return routers


def gateway(upstream: int, home: Path) -> Proc:
    """The gateway of this checkout (`sage-llm gateway run`) with one static route to `upstream`: the hop every
    request pays today, the reference for the routers' hops (its own SAGE_LLM_HOME, nothing started or adopted)."""
    port = free_port()
    env = {**os.environ, "SAGE_LLM_HOME": str(home), "NO_COLOR": "1"}
    return Proc("gateway", [str(BIN / "sage-llm"), "gateway", "run", "--host", "127.0.0.1", "--port", str(port),
                            "--engine-port", str(free_port()), "--ttl", "0", "--no-fallback", "--no-external",
                            "--upstream", f"{TINY_REPO}=http://127.0.0.1:{upstream}/v1"], port, env=env)


def start_upstream_fake() -> Proc:
    port = free_port()
    return Proc("fast-sse", [sys.executable, str(FAST_SSE), str(port), "--tokens", "8", "--delay-ms", "1"],
                port).start()


def ttft_round(procs: dict[str, Proc], engines: list[int], requests: int) -> dict[str, dict[str, float]]:
    """c=1, the paths interleaved (direct, then each router): TTFT p50/p90 per path, each router's CPU per request
    over the window, and its idle CPU and RSS after."""
    paths = {"direct": engines[0], **{n: p.port for n, p in procs.items()}}
    msgs = [{"role": "user", "content": "Say hello."}]
    for port in [*engines, *paths.values()]:  # warm every path (connections, the prompt's cache entry everywhere)
        for _ in range(4):
            chat(port, msgs)
    cpu0 = {n: p.cpu_s() for n, p in procs.items()}
    samples: dict[str, list[float]] = {n: [] for n in paths}
    for i in range(requests):
        for name, port in paths.items():
            if name == "direct":  # the client alternates between the engines itself, as the routers may
                port = engines[i % len(engines)]
            samples[name].append(chat(port, msgs)[0])
    cpu = {n: p.cpu_delta(cpu0[n]) for n, p in procs.items()}
    idle = idle_cpu(procs)
    out = {}
    for name, xs in samples.items():
        xs.sort()
        out[name] = {"p50_ms": statistics.median(xs) * 1e3, "p90_ms": xs[int(0.9 * (len(xs) - 1))] * 1e3}
        if name in cpu:
            out[name].update(cpu_us_per_request=cpu[name] / requests * 1e6, idle_ms_per_s=idle[name],
                             rss_mib=procs[name].rss_mib())
    return out


def report_ttft(title: str, routers: dict[str, Proc], ttft: dict[str, dict[str, float]]) -> None:
    base = ttft["direct"]["p50_ms"]
    print(f"\n{title} (p50 over direct):")
    for name, row in ttft.items():
        extra = (f"; router CPU {row['cpu_us_per_request']:.0f} us/request, idle {row['idle_ms_per_s']:.2f} ms/s, "
                 f"RSS {row['rss_mib']:.0f} MiB") if name in routers else ""
        print(f"  {name:26s} p50 {row['p50_ms']:7.2f} ms ({row['p50_ms'] - base:+6.2f}) p90 {row['p90_ms']:7.2f} ms"
              + extra, flush=True)


def idle_cpu(procs: dict[str, Proc], seconds: float = 5.0) -> dict[str, float]:
    before = {n: p.cpu_s() for n, p in procs.items()}
    time.sleep(seconds)
    return {n: p.cpu_delta(before[n]) / seconds * 1e3 for n, p in procs.items()}  # CPU ms per second


def words(seed: int, n: int = 10) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


def conversations(port: int, engines: list[int], k: int, turns: int, nonce: str) -> dict[str, Any]:
    """K conversations x `turns` turns through `port`; the engines' prefix-cache hit rate over them, and (when the
    router names its replica) how many replicas each conversation touched."""
    before = [cache_counters(p) for p in engines]
    history = [[{"role": "system", "content": f"{nonce}-{c} You answer briefly."}] for c in range(k)]
    touched: list[set[str]] = [set() for _ in range(k)]
    for t in range(turns):
        for c in range(k):
            history[c].append({"role": "user", "content": f"turn {t}: {words(c * 31 + t)}"})
            _ttft, reply, engine = chat(port, history[c])
            history[c].append({"role": "assistant", "content": reply})
            if engine:
                touched[c].add(engine)
    after = [cache_counters(p) for p in engines]
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    per_engine = [int(a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    return {"hit_rate": hits / queries if queries else 0.0, "hits": int(hits), "queries": int(queries),
            "queried_tokens_per_engine": per_engine,
            "replicas_per_conversation": [len(s) for s in touched] if any(touched) else None}


def choose_cost(n: int = 20000) -> dict[str, float]:
    """balance.choose per call, this process: a 10-turn chat body (prefix key), 4 replicas; and a session header."""
    body = {"model": "m", "messages": [{"role": "system", "content": "s" * 400}]
            + [{"role": r, "content": words(i, 60)} for i in range(10) for r in ("user", "assistant")]}
    reps = [balance.Replica(f"e{i}", outstanding=i, capacity=8) for i in range(4)]
    out = {}
    for what, hdrs in (("prefix", None), ("session", {"x-session-id": "abc"})):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                balance.choose(reps, body, hdrs)
            best = min(best, (time.perf_counter() - t) / n)
        out[f"{what}_us"] = best * 1e6
    return out


# -------------------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vllm-router", type=Path, default=Path(os.environ.get("VLLM_ROUTER", "")),
                        help="vllm-router's console script (its own venv)")
    parser.add_argument("--requests", type=int, default=40, help="TTFT requests per path, real engines")
    parser.add_argument("--hop-requests", type=int, default=300, help="TTFT requests per path, fake upstreams")
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--engines", help="PORT_A,PORT_B of two engines already running (else started here)")
    args = parser.parse_args()
    if args.conversations % 2 == 0:
        raise SystemExit("--conversations must be odd (with an even number, round robin pins every conversation)")
    if not args.vllm_router.is_file():
        raise SystemExit("--vllm-router PATH: vllm-router's console script is needed (see this file's docstring)")
    engine_dir = Path(os.environ.get("SAGE_LLM_ENGINE_DIR", ROOT / ".engines" / "cpu")).absolute()
    print(f"machine: {machine()}; load average at start {os.getloadavg()}")
    print(f"balance.choose: {choose_cost()}")
    engines: Engines | None = None
    routers: dict[str, Proc] = {}
    fakes: list[Proc] = []
    gw_home = Path(tempfile.mkdtemp(prefix="bench-routing-gw-"))
    try:
        # the hop alone: the same routers in front of two fast fake upstreams (fixed 8 tokens, 1 ms apart), where
        # the engine's own noise does not hide a millisecond
        fakes = [start_upstream_fake() for _ in range(2)]
        routers = start_routers(args.vllm_router, [f.port for f in fakes])
        routers["gateway (one upstream)"] = gateway(fakes[0].port, gw_home).start()
        report_ttft(f"hop alone (two fast fake upstreams), TTFT at c=1, {args.hop_requests} requests per path, "
                    "interleaved", routers, ttft_round(routers, [f.port for f in fakes], args.hop_requests))
        for proc in [*routers.values(), *fakes]:
            proc.stop()
        routers = {}
        if args.engines:
            ports = [int(p) for p in args.engines.split(",")]
        else:
            if not (engine_dir / "bin" / "vllm").exists():
                raise SystemExit(f"no engine at {engine_dir}: run `make engine`")
            build_tiny_model(TINY_CACHE, engine_dir / "bin" / "python")
            engines = Engines(engine_dir)
            ports = engines.start(2)
        # the hop on a real engine: every router (and the gateway) in front of engine A alone, against direct to A,
        # so that no path is faster only because it happens to pick the less loaded engine
        routers = start_routers(args.vllm_router, ports[:1])
        routers["gateway (one upstream)"] = gateway(ports[0], gw_home).start()
        report_ttft(f"real CPU vLLM engine A behind every router, TTFT at c=1, {args.requests} requests per path, "
                    "interleaved", routers, ttft_round(routers, ports[:1], args.requests))
        for proc in routers.values():
            proc.stop()
        routers = start_routers(args.vllm_router, ports)
        print(f"\nprefix cache, {args.conversations} conversations x {args.turns} turns, interleaved by turn:")
        nonce = f"{time.time_ns():x}"
        for name, proc in routers.items():
            res = conversations(proc.port, ports, args.conversations, args.turns, f"{nonce}-{name.replace(' ', '-')}")
            per = res["replicas_per_conversation"]
            print(f"  {name:26s} hit rate {res['hit_rate']:6.1%} ({res['hits']}/{res['queries']} tokens; per engine "
                  f"{res['queried_tokens_per_engine']})" + (f"; replicas per conversation {per}" if per else ""))
        print(f"load average at end {os.getloadavg()}")
    finally:
        for proc in [*routers.values(), *fakes]:
            with contextlib.suppress(Exception):
                proc.stop()
        if engines is not None:
            engines.stop()
        shutil.rmtree(gw_home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
