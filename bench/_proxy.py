"""Shared by the proxy benches (bench_proxy_stacks.py, bench_gateway.py): the fast upstream, relay/proxy processes,
one measured load run (the `sage-llm bench` load generator, in-process) with the proxy's CPU time and the upstream's
token counters around it, and the LiteLLM side-by-side proxy.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT

from sage_llm.bench import loadgen

FAST_SSE = ROOT / "tests" / "fakes" / "fast_sse.py"
RELAYS = Path(__file__).resolve().parent / "relays"
# the upstream of the anchor: 64 tokens, 1 ms apart
TOKENS = 64
DELAY_MS = 1.0
LITELLM_VERSION = "1.106.12"  # the pin: litellm[proxy]==1.106.12, in its own throwaway venv
LITELLM_VENV = ROOT / ".cache" / "bench-venv-litellm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def upstream_tokens(port: int) -> float:
    """vllm:generation_tokens_total of the upstream (fast_sse), read directly, not through the proxy."""
    _, body = http_get(port, "/metrics")
    return loadgen.parse_metrics(body.decode()).get("vllm:generation_tokens_total", 0.0)


@dataclass
class Proc:
    """A server process under test: its command, port and psutil handle (CPU and RSS of its whole tree)."""

    name: str
    cmd: list[str]
    port: int
    env: dict[str, str] | None = None
    ready_timeout: float = 60.0
    health_path: str = "/health"  # polled until 200
    cwd: Path | None = None
    popen: subprocess.Popen | None = None
    log: Path | None = None

    def start(self) -> Proc:
        fd, path = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")
        self.log = Path(path)
        self.popen = subprocess.Popen(self.cmd, env=self.env, stdout=fd, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.cwd)
        os.close(fd)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.popen.returncode} before it was ready: "
                                 f"{self.cmd}\n{self.log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError):
                if http_get(self.port, self.health_path, timeout=1.0)[0] == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"{self.name} not ready on port {self.port} after {self.ready_timeout:.0f} s: {self.cmd}")

    def stop(self) -> None:
        if self.log is not None:  # a start-up failure has already shown its tail
            self.log.unlink(missing_ok=True)
        if self.popen is None or self.popen.poll() is not None:
            return
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def _tree(self) -> list[Any]:
        import psutil

        assert self.popen is not None
        root = psutil.Process(self.popen.pid)
        return [root, *root.children(recursive=True)]

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds of the process and its live descendants, two ways: the sum over their live threads of
        /proc/PID/task/TID/schedstat (nanoseconds on a CPU), and psutil's cpu_times (user + system, what getrusage
        reports: 10 ms clock ticks, too coarse for a few hundred requests, but it keeps the time of threads that
        have exited). `cpu_delta` picks between them."""
        fine = coarse = 0.0
        for p in self._tree():
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                coarse += t.user + t.system
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{p.pid}/task").iterdir():
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        fine += int((task / "schedstat").read_text().split()[0]) / 1e9
        return fine, coarse

    def cpu_delta(self, before: tuple[float, float]) -> float:
        """CPU seconds since `before`: the schedstat figure, unless threads that exited meanwhile (thread pools)
        make the tick count larger by more than its rounding (2 ticks per process sample)."""
        fine, coarse = self.cpu_s()
        d_fine, d_coarse = fine - before[0], coarse - before[1]
        return d_coarse if d_coarse > d_fine + 0.02 * len(self._tree()) + 0.02 else d_fine

    def rss_mib(self) -> float:
        total = 0
        for p in self._tree():
            with contextlib.suppress(Exception):
                total += p.memory_info().rss
        return total / 2**20


def start_upstream(port: int | None = None) -> Proc:
    port = port or free_port()
    return Proc("upstream", [sys.executable, str(FAST_SSE), str(port), "--tokens", str(TOKENS),
                             "--delay-ms", str(DELAY_MS)], port).start()


def relay(kind: str, upstream_port: int, port: int | None = None) -> Proc:
    """A minimal relay of bench/relays/: aiohttp, aiohttp-uvloop, starlette (uvicorn's auto: httptools + uvloop when
    installed), starlette-h11 (uvicorn with h11 and the asyncio loop), starlette-aiohttp (the same server, aiohttp as
    the upstream client), asyncio, asyncio-uvloop."""
    port = port or free_port()
    script, extra = {
        "aiohttp": ("relay_aiohttp.py", []), "aiohttp-uvloop": ("relay_aiohttp.py", ["--uvloop"]),
        "starlette": ("relay_starlette.py", []),
        "starlette-h11": ("relay_starlette.py", ["--loop", "asyncio", "--http", "h11"]),
        "starlette-aiohttp": ("relay_starlette.py", ["--client", "aiohttp"]),
        "asyncio": ("relay_asyncio.py", []), "asyncio-uvloop": ("relay_asyncio.py", ["--uvloop"]),
    }[kind]
    return Proc(kind, [sys.executable, str(RELAYS / script), str(port), str(upstream_port), *extra], port)


def litellm_bin(path: str | None = None) -> Path | None:
    p = Path(path) if path else LITELLM_VENV / "bin" / "litellm"
    return p if p.exists() else None


def litellm(binary: Path, upstream_port: int, model: str, workdir: Path, port: int | None = None,
            master_key: str | None = None) -> Proc:
    """LiteLLM's proxy in front of the upstream: one worker, the local cost map (no network); no master key, or
    `master_key` (passed in its environment, LITELLM_MASTER_KEY: every request must then carry it)."""
    port = port or free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text("model_list:\n"
                   f"  - model_name: {json.dumps(model)}\n"
                   "    litellm_params:\n"
                   f"      model: {json.dumps('openai/' + model)}\n"
                   f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
                   "      api_key: none\n")
    # 1.106 refuses to start without a master key unless told this is local development
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", NO_PROXY="*", no_proxy="*",
               LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true")
    for var in ("LITELLM_MASTER_KEY", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(var, None)
    if master_key:
        env["LITELLM_MASTER_KEY"] = master_key
        env.pop("LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY")
    # LiteLLM's /health calls the models; /health/liveliness is its plain "up" answer
    return Proc("litellm", [str(binary), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                            "--num_workers", "1"], port, env=env, ready_timeout=180.0,
                health_path="/health/liveliness", cwd=workdir)


def measure(port: int, model: str, concurrency: int, requests: int, upstream_port: int,
            proxy: Proc | None = None, max_tokens: int = TOKENS) -> dict[str, Any]:
    """One load run against 127.0.0.1:port (the loadgen of `sage-llm bench`, raw transport, in this process): TTFT,
    throughput, and when `proxy` is given the proxy's CPU over the run. The upstream's own token counter, read
    directly, must grow by exactly the tokens the client received (nothing lost or duplicated on the way)."""
    cfg = loadgen.BenchConfig(base_url=f"http://127.0.0.1:{port}/v1", model=model, concurrency=concurrency,
                              requests=requests, prompt_tokens=16, max_tokens=max_tokens, metrics=False,
                              timeout_s=120.0)
    tok0 = upstream_tokens(upstream_port)
    cpu0 = proxy.cpu_s() if proxy else (0.0, 0.0)
    doc = loadgen.run_sync(cfg, transport="raw").to_json()
    cpu = proxy.cpu_delta(cpu0) if proxy else None
    tok = upstream_tokens(upstream_port) - tok0
    if doc["failed"]:
        raise SystemExit(f"{port}: {doc['failed']} failed requests: {doc['errors']}")
    if int(tok) != doc["total_output_tokens"]:
        raise SystemExit(f"{port}: the upstream generated {tok:.0f} tokens, the client got "
                         f"{doc['total_output_tokens']}")
    out = {"concurrency": concurrency, "requests": requests, "duration_s": doc["duration_s"],
           "req_per_s": doc["request_throughput"], "tok_per_s": doc["output_throughput"],
           "ttft_p50_ms": doc["ttft_s"]["p50"] * 1000, "ttft_p99_ms": doc["ttft_s"]["p99"] * 1000,
           "tokens": doc["total_output_tokens"]}
    if cpu is not None:
        out["cpu_s"] = cpu
        out["cpu_us_per_request"] = cpu / requests * 1e6
        out["cpu_us_per_token"] = cpu / max(1, doc["total_output_tokens"]) * 1e6
    return out


def cpu_split(proxy: Proc, model: str, upstream_port: int, concurrency: int = 16, requests: int = 320,
              reps: int = 3) -> dict[str, float]:
    """The proxy's CPU as a fixed cost per request plus a marginal cost per token: runs of 1-token requests and of
    64-token requests, alternated; per request = CPU(1-token run) / n, per token = (CPU(64) - CPU(1)) / (63 n)."""
    one, full = [], []
    for _ in range(reps):
        one.append(measure(proxy.port, model, concurrency, requests, upstream_port, proxy, max_tokens=1)["cpu_s"])
        full.append(measure(proxy.port, model, concurrency, requests, upstream_port, proxy)["cpu_s"])
    per_req, per_req_full = statistics.median(one) / requests, statistics.median(full) / requests
    return {"us_per_request": per_req * 1e6, "us_per_token": (per_req_full - per_req) / (TOKENS - 1) * 1e6,
            "us_per_request_of_64_tokens": per_req_full * 1e6, "runs": reps, "requests_per_run": requests,
            "concurrency": concurrency}


def med(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, spec: str = "{:.1f}") -> str:
    return "-" if v is None else spec.format(v)
