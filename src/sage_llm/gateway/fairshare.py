"""Fair share of a saturated engine between keys, and per-key limits (429).

Admission: the gateway lets at most `capacity` requests at a time through to an engine, where capacity is vLLM's
`max_num_seqs` (the number of sequences its scheduler runs at once). Past that vLLM would queue first come, first
served, and one key with 64 requests waiting would delay a key with one. So the gateway holds the excess itself and
releases it, one request per freed slot, by fair queueing over tokens (start-time fair queueing: each key's requests
are tagged with the virtual time at which the key's earlier requests, weighted by their tokens, are done; the
smallest tag goes next). That is deficit round robin's fairness by tokens without its quantum-sized bursts (with DRR a
one-request key waits for a whole quantum of another key's requests). It is work-conserving: whenever a slot is free
and anyone waits, someone is admitted; an idle key's share goes to the others.

Capacity comes from the launch arguments (`--max-num-seqs N` in the model's profile args or the engine's record;
vLLM's default 256 otherwise), not from /metrics: the gateway knows exactly what it has in flight (all shared traffic
goes through it) at no cost and with no lag, whereas the running/waiting gauges are polled (stale by a scrape
interval) and cost an HTTP round trip per decision. Cloud routes are not admitted (their capacity is not ours).

Limits per key (keys.py): `max_concurrency` (requests in flight) and `tokens_per_minute` (prompt + completion tokens
of the last 60 s, from the engine's usage); over either: 429 with Retry-After, in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict, deque
from typing import Any

from sage_llm.gateway import bodies
from sage_llm.gateway.keys import Key
from sage_llm.gateway.options import Profile
from sage_llm.gateway.router import Backend, GatewayError
from sage_llm.gateway.usage import Meter, UsageLog

DEFAULT_SEQS = 256  # vLLM's default --max-num-seqs
DEFAULT_COST = 256  # tokens charged for a request that names no max_tokens
WINDOW_S = 60.0


def max_num_seqs(args: list[str] | None) -> int | None:
    args = list(args or [])
    for i, a in enumerate(args):
        raw = a.split("=", 1)[1] if a.startswith("--max-num-seqs=") else \
            (args[i + 1] if a == "--max-num-seqs" and i + 1 < len(args) else None)
        if raw is not None:
            with contextlib.suppress(ValueError):
                return max(1, int(raw))
    return None


def capacity(backend: Backend, profiles: dict[str, Profile]) -> int:
    slot = backend.slot
    profile = slot.profile if slot is not None and slot.profile is not None else profiles.get(backend.engine)
    found = max_num_seqs(profile.args) if profile is not None else None
    if found is None and slot is not None and slot.engine is not None and slot.engine.managed:
        from sage_llm.core.state import EngineRecord, StateStore

        with contextlib.suppress(Exception):
            rec = StateStore().load(slot.engine.name)
            if isinstance(rec, EngineRecord):
                found = max_num_seqs(rec.argv)
    return found or DEFAULT_SEQS


def cost(body: dict[str, Any] | None, raw: bytes) -> int:
    """Tokens a request is charged in the fair queue: its completion budget plus a rough prompt size."""
    limit = (body or {}).get("max_tokens") or (body or {}).get("max_completion_tokens")
    budget = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else DEFAULT_COST
    return min(budget, 32768) + len(raw) // 4


class EngineQueue:
    """Admission to one engine: `capacity` slots, waiting requests per key in fair order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running = 0
        self.vtime = 0.0
        self.finish: dict[str, float] = {}
        self.waiting: dict[str, deque[tuple[float, asyncio.Future[None]]]] = {}

    async def acquire(self, who: str, tokens: int) -> None:
        start = max(self.vtime, self.finish.get(who, 0.0))
        self.finish[who] = start + tokens  # admitted at once or not, what a key runs counts against its next turn
        if self.running < self.capacity and not self.waiting:
            self.vtime = start
            self.running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(who, deque()).append((start, fut))
        self._dispatch()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # admitted, then the client left before it could use the slot
            self._dispatch()
            raise

    def release(self) -> None:
        self.running -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.running < self.capacity and self.waiting:
            best: str | None = None
            for who, q in list(self.waiting.items()):
                while q and q[0][1].done():
                    q.popleft()  # cancelled while waiting
                if not q:
                    del self.waiting[who]
                elif best is None or q[0][0] < self.waiting[best][0][0]:
                    best = who
            if best is None:
                return
            tag, fut = self.waiting[best].popleft()
            if not self.waiting[best]:
                del self.waiting[best]
            self.vtime = max(self.vtime, tag)
            self.running += 1
            fut.set_result(None)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())


class Share:
    """Admission, limits and accounting for the requests of keyed callers (gateway/access.py)."""

    def __init__(self, usage: UsageLog, profiles: dict[str, Profile]) -> None:
        self.usage = usage
        self.profiles = profiles
        self.engines: dict[str, EngineQueue] = {}
        self.in_flight: dict[str, int] = defaultdict(int)
        self.spent: dict[str, deque[tuple[float, int]]] = defaultdict(deque)

    def _limits(self, key: Key) -> None:
        if key.max_concurrency is not None and self.in_flight[key.name] >= key.max_concurrency:
            raise GatewayError(429, f"key {key.name!r} has {self.in_flight[key.name]} requests in flight: its "
                               f"max_concurrency limit is {key.max_concurrency}", "requests",
                               "rate_limit_exceeded", retry_after=1)
        if key.tokens_per_minute is not None:
            spent = self.spent[key.name]
            now = time.monotonic()
            while spent and spent[0][0] <= now - WINDOW_S:
                spent.popleft()
            used = sum(n for _, n in spent)
            if used >= key.tokens_per_minute:
                wait = max(1.0, spent[0][0] + WINDOW_S - now) if spent else 1.0
                raise GatewayError(429, f"key {key.name!r} used {used} tokens in the last minute: its "
                                   f"tokens_per_minute limit is {key.tokens_per_minute}", "tokens",
                                   "rate_limit_exceeded", retry_after=wait + 0.999)

    def _done(self, meter: Meter, status: int, stream: bool) -> None:
        tokens = meter.prompt + meter.completion
        if tokens:
            now = time.monotonic()
            spent = self.spent[meter.key]
            spent.append((now, tokens))
            while spent[0][0] <= now - WINDOW_S:  # only the last minute counts: a key without a tokens_per_minute
                spent.popleft()  # limit (never checked in _limits) must not keep every request it ever made
        self.usage.record(meter.key, meter.model, status, meter.prompt, meter.completion, stream)

    def admit(self, key: Key, backend: Backend, body: dict[str, Any] | None, raw: bytes, label: str) -> Admission:
        """`async with share.admit(...) as (meter, raw)`: waits for this key's fair turn at the engine; gives the
        request's meter and the bytes to send (with `stream_options.include_usage` added to a stream that did not
        ask for it). 429 (GatewayError) over a per-key limit."""
        self._limits(key)
        strip = False
        if body is not None and body.get("stream") is True:
            opts = body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage")):
                absent = "stream_options" not in body
                body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                # a new key is appended to the bytes as sent (no re-encoding); a present one is replaced by one
                raw = bodies.add_member(raw, "stream_options", body["stream_options"]) if absent else \
                    json.dumps(body).encode()
                strip = True
        queue = None
        if backend.source == "local":
            queue = self.engines.get(backend.engine)
            if queue is None:
                queue = self.engines[backend.engine] = EngineQueue(capacity(backend, self.profiles))
        return Admission(self, key.name, queue, cost(body, raw) if queue is not None else 0,
                         Meter(key.name, label, strip, self._done), raw)

    def describe(self) -> dict[str, Any]:
        return {name: {"capacity": q.capacity, "running": q.running, "queued": q.queued}
                for name, q in self.engines.items()}


class Admission:
    """One request's turn at an engine (a plain class: an asynccontextmanager costs several us per request)."""

    __slots__ = ("meter", "name", "queue", "raw", "share", "tokens")

    def __init__(self, share: Share, name: str, queue: EngineQueue | None, tokens: int, meter: Meter, raw: bytes
                 ) -> None:
        self.share, self.name, self.queue, self.tokens, self.meter, self.raw = share, name, queue, tokens, meter, raw

    async def __aenter__(self) -> tuple[Meter, bytes]:
        self.share.in_flight[self.name] += 1
        if self.queue is not None:
            try:
                await self.queue.acquire(self.name, self.tokens)
            except BaseException:
                self.share.in_flight[self.name] -= 1
                raise
        return self.meter, self.raw

    async def __aexit__(self, *exc: object) -> None:
        if self.queue is not None:
            self.queue.release()
        self.share.in_flight[self.name] -= 1

