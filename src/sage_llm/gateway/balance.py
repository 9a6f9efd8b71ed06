"""Which replica of a model answers a request: least outstanding requests, with affinity.

Pure policy (no I/O, no clock, no randomness): the gateway hands it the model's ready replicas and the request's
parsed JSON body (and headers), and gets one replica back. The rule is the consensus of vllm-router's cache_aware
policy, Ray Serve's prefix and session routers and production-stack's session router (docs/gateway.md, "A cluster
behind one endpoint"; measured against vllm-router in docs/benchmarks.md, "Routing across replicas"):

- A request that carries a conversation key goes to the replica the key hashes to, so that every turn of a
  conversation lands where its prefix is already in the KV cache. The key is, first found: a session header
  (`x-session-id`, `x-session`, `x-user-id`), the body's `user` field, else a hash of a bounded prefix of the
  prompt: the messages up to and including the first user message (the system prompt and the opening question,
  the same in every turn; at most AFFINITY_MESSAGES of them), or the start of `prompt`, cut to AFFINITY_BYTES.
- Rendezvous (highest random weight) hashing ranks the replicas for a key: adding or removing one replica moves
  only the keys whose first choice it is (or becomes); every other conversation keeps its replica.
- Affinity holds while the preferred replica is not overloaded: its outstanding requests stay under
  `Balance.overload` x its capacity, or within `Balance.slack` requests of the least loaded replica. Past that the
  next replica of the key's ranking that is not overloaded answers (so a hot conversation spills to the same
  second replica every time), and when all are, the least loaded one.
- Without a key: least outstanding requests relative to capacity, ties broken by the replicas' order of names.

The retry rule lives here too (`retry_target`): a request that failed before any byte reached the client may be
sent once more, to another replica; never a second time, never after a byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

AFFINITY_MESSAGES = 4
AFFINITY_BYTES = 2048
SESSION_HEADERS = ("x-session-id", "x-session", "x-user-id")


@dataclass(frozen=True)
class Replica:
    """One ready replica of a model as the router sees it."""

    engine: str  # the engine's name (what `x-sage-llm-engine` shows)
    node: str | None = None  # its node (Ray node id or address), None on this machine
    outstanding: int = 0  # requests sent to it that have not finished
    capacity: int = 1  # requests it serves at once (vLLM's max_num_seqs), at least 1


@dataclass(frozen=True)
class Balance:
    """The policy's two knobs: a replica is overloaded when its outstanding requests reach `overload` x capacity
    AND exceed the least loaded replica's by more than `slack` (both: a small model at light load keeps affinity)."""

    overload: float = 1.0
    slack: int = 4


@dataclass(frozen=True)
class Choice:
    replica: Replica
    reason: str  # "affinity", "spill" (affinity's replica overloaded), "least" (no key, or all overloaded), "only"
    key: str | None  # the affinity key: its kind and a digest, e.g. "session:3f2a9c0d1e2b4a5f", for logs and metrics


def affinity_key(body: Mapping[str, Any] | None, headers: Mapping[str, str] | None = None) -> str | None:
    """The conversation key of a request, or None when it has none (no session, no user, no prompt)."""
    if headers:
        # a request's headers (case-insensitive already) are asked directly; a plain mapping is lowered first
        get = headers.get if isinstance(headers, (CIMultiDict, CIMultiDictProxy)) else \
            {k.lower(): v for k, v in headers.items()}.get
        for name in SESSION_HEADERS:
            value = get(name)
            if value:
                return "session:" + _digest(value.encode("utf-8", "replace")[:AFFINITY_BYTES])
    if not isinstance(body, Mapping):
        return None
    user = body.get("user")
    if isinstance(user, str) and user:
        return "user:" + _digest(user.encode("utf-8", "replace")[:AFFINITY_BYTES])
    prefix = _prompt_prefix(body)
    return "prefix:" + _digest(prefix) if prefix else None


def _prompt_prefix(body: Mapping[str, Any]) -> bytes:
    """The leading messages through the first user message (role and content), or the prompt, cut to
    AFFINITY_BYTES: the same for every turn of one conversation, whatever it grew to since."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        parts: list[bytes] = []
        size = 0
        for m in messages[:AFFINITY_MESSAGES]:
            if not isinstance(m, Mapping):
                continue
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True, default=str)
            part = f"{m.get('role')}\x1f{text}\x1e".encode("utf-8", "replace")
            parts.append(part[:AFFINITY_BYTES - size])
            size += len(parts[-1])
            if size >= AFFINITY_BYTES or m.get("role") == "user":
                break
        return b"".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt.encode("utf-8", "replace")[:AFFINITY_BYTES]
    return b""


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _weight(key: str, engine: str) -> int:
    """Rendezvous weight of `engine` for `key`: stable across processes and runs (no Python hash seed)."""
    return int.from_bytes(hashlib.blake2b(f"{key}\x00{engine}".encode(), digest_size=8).digest(), "big")


def ranking(key: str, replicas: Sequence[Replica]) -> list[Replica]:
    """The replicas in the order `key` prefers them (rendezvous hashing: highest weight first)."""
    return sorted(replicas, key=lambda r: (-_weight(key, r.engine), r.engine))


def _load(r: Replica) -> float:
    return r.outstanding / max(1, r.capacity)


def least_loaded(replicas: Sequence[Replica]) -> Replica:
    return min(replicas, key=lambda r: (_load(r), r.outstanding, r.engine))


def overloaded(r: Replica, least: Replica, policy: Balance) -> bool:
    return r.outstanding >= policy.overload * max(1, r.capacity) and r.outstanding - least.outstanding > policy.slack


def choose(replicas: Sequence[Replica], body: Mapping[str, Any] | None = None,
           headers: Mapping[str, str] | None = None, policy: Balance = Balance(),
           exclude: frozenset[str] = frozenset()) -> Choice | None:
    """The replica for this request (None when there is none to choose from, `exclude`d ones left out)."""
    pool = [r for r in replicas if r.engine not in exclude]
    if not pool:
        return None
    key = affinity_key(body, headers)
    if len(pool) == 1:
        return Choice(pool[0], "only", key)
    least = least_loaded(pool)
    if key is None:
        return Choice(least, "least", None)
    ranked = ranking(key, pool)
    for i, r in enumerate(ranked):
        if not overloaded(r, least, policy):
            return Choice(r, "affinity" if i == 0 else "spill", key)
    return Choice(least, "least", key)


def retry_target(replicas: Sequence[Replica], failed: str, body: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, *, sent_bytes: int, attempt: int,
                 policy: Balance = Balance()) -> Choice | None:
    """Where a failed request goes next, or None when it must not be retried: only the first attempt (`attempt`
    1), only when nothing reached the client yet (`sent_bytes` 0), and only to another replica."""
    if attempt != 1 or sent_bytes != 0:
        return None
    return choose(replicas, body, headers, policy, exclude=frozenset({failed}))
