"""Load generator for `sage-llm bench`: concurrent streaming chat requests against an OpenAI-compatible engine.

Measures, per request, the time to first token (TTFT), the gaps between streamed tokens (inter-token latency), the
total latency and the tokens in and out (from the server's `usage` when it sends it, else counted chunks); and for the
run, request and output-token throughput. The engine's own Prometheus counters (`vllm:prompt_tokens_total`,
`vllm:generation_tokens_total`) are read before and after, so the client's token counts can be cross-checked.

No Rich and no Typer here: progress goes to an `on_progress(dict)` callback a few times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sage_llm.observe.probe import split_chunks

PROMPT_WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers mountains "
                "and cities under bright stars").split()
_TIMEOUT_CM = getattr(asyncio, "timeout", None)
CONTENT_RE = re.compile(rb'"content"\s*:\s*"(?!")')  # a non-empty content string in a streamed delta
METRIC_RE = re.compile(r"^(vllm:(?:prompt|generation)_tokens_total)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.MULTILINE)


@dataclass
class BenchConfig:
    base_url: str  # e.g. http://127.0.0.1:8001/v1
    model: str
    concurrency: int = 8
    requests: int = 100
    prompt_tokens: int = 32
    max_tokens: int = 64
    api_key: str | None = None
    timeout_s: float = 300.0  # per request
    ignore_eos: bool = False  # vLLM: always generate max_tokens
    metrics: bool = True  # read /metrics before and after

    def validate(self) -> None:
        from sage_llm.core.errors import UsageError

        for label, value in (("--concurrency", self.concurrency), ("--requests", self.requests),
                             ("--prompt-tokens", self.prompt_tokens), ("--max-tokens", self.max_tokens)):
            if value < 1:
                raise UsageError(f"{label} {value} must be 1 or more", hint=f"e.g. {label} 8")
        if self.concurrency > 4096:
            raise UsageError(f"--concurrency {self.concurrency} is more than 4096",
                             hint="use fewer concurrent requests")


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0  # perf_counter, relative to the run's start
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage: bool = False  # token counts came from the server's usage block
    error: str | None = None


def _skip_missing_sniffio() -> None:
    """httpcore runs `import sniffio` on every request; recent anyio no longer installs it, and a failing import scans
    sys.path each time (about a third of the client's CPU). When it is absent, say so once, so the import fails at
    once and httpcore takes its asyncio fallback."""
    import importlib.util
    import sys

    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _dist(values: list[float]) -> dict[str, float | None]:
    return {"mean": sum(values) / len(values) if values else None, "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99)}


@dataclass
class BenchReport:
    config: BenchConfig
    results: list[RequestResult]
    duration_s: float
    metrics_before: dict[str, float] | None = None
    metrics_after: dict[str, float] | None = None
    metrics_error: str | None = None
    prompt: PromptPlan | None = None

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def to_json(self) -> dict[str, Any]:
        ok = self.ok
        out_tokens = sum(r.output_tokens for r in ok)
        prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        errors: dict[str, int] = {}
        for r in self.results:
            if not r.ok:
                errors[r.error or "error"] = errors.get(r.error or "error", 0) + 1
        tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
                if r.latency is not None and r.ttft is not None and r.output_tokens > 1]
        doc: dict[str, Any] = {
            "base_url": self.config.base_url, "model": self.config.model,
            "concurrency": self.config.concurrency, "requests": self.config.requests,
            "prompt_tokens": self.config.prompt_tokens, "max_tokens": self.config.max_tokens,
            "completed": len(ok), "failed": len(self.results) - len(ok), "errors": errors,
            "duration_s": self.duration_s,
            "request_throughput": len(ok) / self.duration_s if self.duration_s > 0 else None,
            "output_throughput": out_tokens / self.duration_s if self.duration_s > 0 else None,
            "total_output_tokens": out_tokens,
            "total_prompt_tokens": sum(prompt) if prompt else None,
            # what each request really sent, as the engine counted it (usage): the number to read, not the asked one
            "prompt_tokens_per_request": _per_request(prompt),
            "prompt": self.prompt.to_json() if self.prompt is not None else None,
            "ttft_s": _dist([r.ttft for r in ok if r.ttft is not None]),
            "itl_s": _dist([g for r in ok for g in r.itl]),
            "tpot_s": _dist(tpot),
            "latency_s": _dist([r.latency for r in ok if r.latency is not None]),
            "token_counts_from": "usage" if ok and all(r.usage for r in ok) else "chunks",
            "server_metrics": self.cross_check(out_tokens, sum(prompt) if prompt else None),
        }
        return doc

    def cross_check(self, client_out: int, client_prompt: int | None) -> dict[str, Any]:
        """The engine's own token counters over the run, against the client's counts."""
        if self.metrics_before is None or self.metrics_after is None:
            return {"available": False, "error": self.metrics_error}
        gen = self.metrics_after.get("vllm:generation_tokens_total", 0.0) - \
            self.metrics_before.get("vllm:generation_tokens_total", 0.0)
        prm = self.metrics_after.get("vllm:prompt_tokens_total", 0.0) - \
            self.metrics_before.get("vllm:prompt_tokens_total", 0.0)
        return {"available": True, "generation_tokens": int(gen), "prompt_tokens": int(prm),
                "generation_tokens_match": int(gen) == client_out,
                "prompt_tokens_match": None if client_prompt is None else int(prm) == client_prompt,
                "note": None if int(gen) == client_out else
                "the engine counted other traffic too, or requests failed mid-stream"}


def _per_request(counts: list[int]) -> float | int | None:
    """The prompt tokens of one request: an int when every request sent the same, else the mean."""
    if not counts:
        return None
    return counts[0] if len(set(counts)) == 1 else sum(counts) / len(counts)


def prompt_deviation(doc: dict[str, Any]) -> str | None:
    """A sentence when the prompt tokens each request sent (engine usage) differ from --prompt-tokens by over 10 %."""
    sent, asked = doc.get("prompt_tokens_per_request"), doc.get("prompt_tokens")
    if sent is None or not asked or abs(sent - asked) <= 0.1 * asked:
        return None
    why = (doc.get("prompt") or {}).get("note")
    return f"each request sent {sent:g} prompt tokens as the engine counted them, not the {asked} asked" + \
        (f": {why}" if why else "")


def parse_metrics(text: str) -> dict[str, float]:
    """Sums of vLLM's token counters over every label set."""
    totals: dict[str, float] = {}
    for name, value in METRIC_RE.findall(text):
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals


def make_prompt(n_words: int, filler: int = 0) -> str:
    """`n_words` plain words, then `filler` single letters (small steps, to fine-tune the token count)."""
    return " ".join([*(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(n_words)), *(["a"] * filler)])


@dataclass
class PromptPlan:
    """The prompt every request sends, and how its size was set."""

    text: str
    asked: int  # --prompt-tokens
    counted: int | None = None  # the engine's count of the whole prompt, chat template included (/tokenize)
    method: str = "words"  # "tokenize": calibrated with the engine's tokenizer; "words": one word per token assumed
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "tokens": self.counted, "note": self.note}


async def _tokenize_count(client: Any, root: str, model: str, text: str, headers: dict[str, str]) -> int:
    """The prompt tokens of one chat request with `text` as the user message, as the engine counts them (vLLM's
    POST /tokenize with the messages: the chat template and the generation prompt included, like the request)."""
    resp = await client.post(root + "/tokenize", headers=headers, json={
        "model": model, "messages": [{"role": "user", "content": text}], "add_generation_prompt": True})
    resp.raise_for_status()
    count = resp.json().get("count")
    if not isinstance(count, int):
        raise ValueError("no count in the /tokenize answer")
    return count


async def plan_prompt(client: Any, root: str, model: str, target: int, headers: dict[str, str]) -> PromptPlan:
    """A user message whose whole chat prompt is `target` tokens as the engine counts them (vLLM's /tokenize):
    bisection on the number of words (a count never falls when a word is added), then on single-letter filler to
    close the gap. A server without /tokenize gets `target` words, and the report shows what the engine counted."""
    cache: dict[tuple[int, int], int] = {}

    async def count(words: int, filler: int = 0) -> int:
        if (words, filler) not in cache:
            cache[(words, filler)] = await _tokenize_count(client, root, model, make_prompt(words, filler), headers)
        return cache[(words, filler)]

    try:
        smallest = await count(1)
        if smallest >= target:
            return PromptPlan(make_prompt(1), target, smallest, "tokenize", None if smallest == target else
                              f"the chat template and one word are already {smallest} tokens, the smallest prompt "
                              "this model takes")
        lo, hi = 1, max(2, target)  # count(lo) < target; each word is at least one token, so count(hi) >= target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if await count(mid) <= target:
                lo = mid
            else:
                hi = mid
        best = (lo, 0)
        gap = target - await count(lo)
        if gap > 0:  # letters: ~1 token each; the largest filler that does not overshoot
            flo, fhi = 0, gap + 1
            while fhi - flo > 1:
                mid = (flo + fhi) // 2
                if await count(lo, mid) <= target:
                    flo = mid
                else:
                    fhi = mid
            best = (lo, flo)
        if await count(hi) - target < target - await count(*best):
            best = (hi, 0)
        return PromptPlan(make_prompt(*best), target, await count(*best), "tokenize")
    except Exception as exc:  # no /tokenize (an OpenAI-compatible server that is not vLLM), or it failed
        return PromptPlan(make_prompt(target), target, None, "words",
                          f"{target} words sent (one token each assumed): the server's /tokenize is unavailable "
                          f"({_exc_text(exc)})")


def _server_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


class _Stream:
    """SSE event parsing shared by both transports: fills a RequestResult as chunks arrive."""

    __slots__ = ("buf", "chunks", "done", "last", "res", "start")

    def __init__(self, res: RequestResult, start: float) -> None:
        self.res, self.start = res, start
        self.buf = b""
        self.last: float | None = None
        self.chunks = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            i = buf.find(b"\n\n")
            if i < 0:
                break
            event, buf = buf[:i], buf[i + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip())
        self.buf = buf

    def _event(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        if b'"usage"' in payload or b'"error"' in payload:
            msg = json.loads(payload)
            if msg.get("error"):
                err = msg["error"]
                raise RuntimeError(str(err.get("message", err) if isinstance(err, dict) else err)[:200])
            usage = msg.get("usage")
            if usage:
                self.res.output_tokens = int(usage.get("completion_tokens") or 0)
                self.res.prompt_tokens = usage.get("prompt_tokens")
                self.res.usage = True
            has_content = any((c.get("delta") or {}).get("content") for c in msg.get("choices") or ())
        else:
            # the hot path: a token chunk. A non-empty "content" string is all we need to know (no JSON parse)
            has_content = CONTENT_RE.search(payload) is not None
        if has_content:
            now = time.perf_counter()
            if self.last is None:
                self.res.ttft = now - self.start
            else:
                self.res.itl.append(now - self.last)
            self.last = now
            self.chunks += 1

    def finish(self) -> RequestResult:
        res = self.res
        if not self.done:
            res.error = "stream ended without [DONE]"
            return res
        res.latency = time.perf_counter() - self.start
        if not res.usage:
            res.output_tokens = self.chunks
        res.ok = True
        return res


async def _one(client: Any, body: bytes, headers: dict[str, str], t0: float) -> RequestResult:
    """One streamed request through httpx (any URL: https, proxies)."""
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start - t0)
    stream = _Stream(res, start)
    try:
        async with client.stream("POST", "/chat/completions", content=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = _error_text(resp.status_code, await resp.aread())
                return res
            async for data in resp.aiter_bytes():
                stream.feed(data)
    except Exception as exc:  # one failed request is a data point, not the end of the run
        res.error = _exc_text(exc)
        return res
    return stream.finish()


class _HttpProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client connection for plain-http engines, one per concurrent worker.

    httpx costs 2-5 ms of CPU per streamed request on a small machine (its pool, anyio, h11); this costs about a
    twentieth of that, so the client is never what a benchmark measures. It parses in `data_received` (no stream
    reader, one wake-up per request) just what an OpenAI-compatible server answers: a status line, headers, then a
    chunked or fixed-length body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.stream: _Stream | None = None
        self.buf = b""
        self.state = "idle"  # idle | head | chunks | body
        self.status = 0
        self.remaining = 0  # body bytes still expected (fixed length)
        self.chunked = False
        self.keep_alive = True
        self.body_parts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.state == "body" and not self.chunked and self.remaining < 0:
            self._done()  # body delimited by the connection's end
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed mid-response"))

    def send(self, data: bytes, stream: _Stream) -> asyncio.Future[None]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.stream, self.state, self.buf, self.body_parts = stream, "head", b"", []
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        try:
            self._parse(self.buf + data if self.buf else data)
        except Exception as exc:  # a protocol error or the stream's own error event
            self.state = "idle"
            if self.transport is not None:
                self.transport.close()
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)

    def _parse(self, buf: bytes) -> None:
        pos = 0
        if self.state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            lines = buf[:end].split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            self.chunked, self.remaining, self.keep_alive = False, -1, True
            for ln in lines[1:]:
                key, _, value = ln.partition(b":")
                key = key.strip().lower()
                if key == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
                elif key == b"content-length":
                    self.remaining = int(value)
                elif key == b"connection" and b"close" in value.lower():
                    self.keep_alive = False
            self.state = "body"
            pos = end + 4
        if self.state != "body":
            self.buf = b""
            return
        if not self.chunked:
            piece = buf[pos:] if self.remaining < 0 else buf[pos:pos + self.remaining]
            self.body_parts.append(piece)
            if self.remaining >= 0:
                self.remaining -= len(piece)
                if self.remaining == 0:
                    self._done()
            self.buf = b""
            return
        parts, pos, finished = split_chunks(buf, pos)  # what arrived together is parsed together (same arrival time)
        self._feed(parts)
        if finished:
            self.buf = b""
            self._done()
            return
        self.buf = buf[pos:]

    def _feed(self, parts: list[bytes]) -> None:
        if not parts:
            return
        if self.status == 200:
            assert self.stream is not None
            self.stream.feed(b"".join(parts))
        else:
            self.body_parts.extend(parts)

    def _done(self) -> None:
        self.state = "idle"
        if not self.keep_alive and self.transport is not None:
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _ProtocolConnection:
    """One keep-alive connection (reopened when the server closes it) running requests one after another."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str], timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.proto: _HttpProtocol | None = None
        head = [f"POST {path} HTTP/1.1", f"host: {host}:{port}", "connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.head = ("\r\n".join(head) + "\r\n").encode()

    async def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None

    async def request(self, body: bytes, t0: float) -> RequestResult:
        start = time.perf_counter()
        res = RequestResult(ok=False, start=start - t0)
        stream = _Stream(res, start)
        try:
            if self.proto is None or self.proto.transport is None or self.proto.transport.is_closing():
                _, proto = await asyncio.get_running_loop().create_connection(_HttpProtocol, self.host, self.port)
                self.proto = proto
            proto = self.proto
            waiter = proto.send(self.head + b"content-length: %d\r\n\r\n" % len(body) + body, stream)
            if _TIMEOUT_CM is not None:
                async with _TIMEOUT_CM(self.timeout):
                    await waiter
            else:
                await asyncio.wait_for(waiter, self.timeout)
        except Exception as exc:
            await self.close()
            res.error = "timeout" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else _exc_text(exc)
            return res
        if proto.status != 200:
            res.error = _error_text(proto.status, b"".join(proto.body_parts))
            return res
        if not proto.chunked:
            stream.feed(b"".join(proto.body_parts))
        return stream.finish()


def _error_text(status: int, raw: bytes) -> str:
    try:
        msg = json.loads(raw)
        err = msg.get("error") if isinstance(msg, dict) else None
        text = err.get("message") if isinstance(err, dict) else (err or msg.get("detail") or raw[:120].decode())
    except (ValueError, AttributeError):
        text = raw[:120].decode("utf-8", "replace")
    return f"HTTP {status}: {str(text)[:160]}"


def _exc_text(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip()
    return f"{name}: {text[:160]}" if text else name


async def _read_metrics(client: Any, root: str) -> dict[str, float]:
    resp = await client.get(root + "/metrics")
    resp.raise_for_status()
    return parse_metrics(resp.text)


def live_summary(results: list[RequestResult], started: float, total: int) -> dict[str, Any]:
    """A cheap snapshot for the progress view."""
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok[-500:] if r.ttft is not None]
    return {"done": len(results), "total": total, "ok": len(ok), "errors": len(results) - len(ok),
            "elapsed_s": elapsed, "request_throughput": len(ok) / elapsed if elapsed > 0 else 0.0,
            "output_throughput": sum(r.output_tokens for r in ok) / elapsed if elapsed > 0 else 0.0,
            "ttft_p50_s": percentile(ttfts, 50)}


async def run(cfg: BenchConfig, on_progress: Callable[[dict[str, Any]], None] | None = None,
              progress_interval: float = 0.25, transport: str = "auto") -> BenchReport:
    """Send `cfg.requests` streaming chat requests, at most `cfg.concurrency` at a time.

    `transport`: "auto" (the raw HTTP/1.1 client for plain http, else httpx), "raw" or "httpx". /metrics is always
    read with httpx."""
    import httpx

    _skip_missing_sniffio()
    cfg.validate()
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if cfg.api_key:
        headers["authorization"] = f"Bearer {cfg.api_key}"
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    timeout = httpx.Timeout(cfg.timeout_s, connect=10.0)
    root = _server_root(cfg.base_url)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), limits=limits, timeout=timeout,
                                 trust_env=False) as client:
        auth = {"authorization": headers["authorization"]} if cfg.api_key else {}
        plan = await plan_prompt(client, root, cfg.model, cfg.prompt_tokens, auth)
        body = json.dumps({
            "model": cfg.model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": plan.text}],
            "max_tokens": cfg.max_tokens, "temperature": 0.0, **({"ignore_eos": True} if cfg.ignore_eos else {}),
        }).encode()
        before = after = None
        metrics_error = None
        if cfg.metrics:
            try:
                before = await _read_metrics(client, root)
            except Exception as exc:
                metrics_error = f"/metrics unavailable: {_exc_text(exc)}"
        remaining = cfg.requests
        t0 = time.perf_counter()

        raw = _raw_target(cfg.base_url) if transport != "httpx" else None
        if transport == "raw" and raw is None:
            from sage_llm.core.errors import UsageError

            raise UsageError(f"the raw transport needs a plain http:// URL, not {cfg.base_url}")

        async def worker() -> None:
            nonlocal remaining
            conn = _ProtocolConnection(raw[0], raw[1], raw[2], headers, cfg.timeout_s) if raw else None
            try:
                while remaining > 0:
                    remaining -= 1
                    results.append(await conn.request(body, t0) if conn else await _one(client, body, headers, t0))
            finally:
                if conn is not None:
                    await conn.close()

        ticker = None
        if on_progress is not None:
            async def tick() -> None:
                while True:
                    on_progress(live_summary(results, t0, cfg.requests))
                    await asyncio.sleep(progress_interval)
            ticker = asyncio.create_task(tick())
        try:
            await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, cfg.requests))))
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
        duration = time.perf_counter() - t0
        if on_progress is not None:
            on_progress(live_summary(results, t0, cfg.requests))
        if cfg.metrics and before is not None:
            try:
                after = await _read_metrics(client, root)
            except Exception as exc:
                metrics_error = f"/metrics unavailable after the run: {_exc_text(exc)}"
    return BenchReport(cfg, results, duration, before, after, metrics_error, plan)


def run_sync(cfg: BenchConfig, on_progress: Callable[[dict[str, Any]], None] | None = None,
             transport: str = "auto") -> BenchReport:
    return asyncio.run(run(cfg, on_progress, transport=transport))


def _raw_target(base_url: str) -> tuple[str, int, str] | None:
    """(host, port, path of /chat/completions) for a plain http URL without a proxy in the way; else None."""
    import os
    from urllib.parse import urlsplit

    u = urlsplit(base_url.rstrip("/"))
    if u.scheme != "http" or not u.hostname or u.username:
        return None
    if any(os.environ.get(v) for v in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        no_proxy = os.environ.get("NO_PROXY", os.environ.get("no_proxy", ""))
        if u.hostname not in ("127.0.0.1", "localhost", "::1") and u.hostname not in no_proxy:
            return None
    return u.hostname, u.port or 80, (u.path or "") + "/chat/completions"
