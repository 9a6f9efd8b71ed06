"""JSON request bodies, read once and strictly: what the gateway decides from is what the upstream reads.

A body the gateway parsed one way and the engine (or the cloud) another would let a request pass one check and do
something else: duplicate keys (Python keeps the last, other parsers the first), `NaN`/`Infinity` (not JSON), and
nesting deep enough to exhaust the parser's stack (a RecursionError, a 500 before this). Each is a 400 naming what is
wrong. The size is bounded before this (the gateway's --max-body), and so is the number of values (a 30 MiB array
of `{}` takes seconds to parse); bodies over 1 MiB are parsed in a worker thread, off the event loop that relays
every other stream.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

MAX_VALUES = 1_000_000  # separators counted before parsing (cheap); a long chat or a batch of token ids is far below
THREAD_BYTES = 1 << 20
_CONTROL = re.compile("[\x00-\x1f\x7f]")
MAX_MODEL_NAME = 256  # hub ids are at most 96 characters; a served name or a local path is longer but not this long


class BodyRefused(ValueError):
    """A body that is not one plain JSON object."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BodyRefused(f"the JSON body has the key {key[:64]!r} twice: send it once")
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    raise BodyRefused(f"the JSON body contains {name}, which is not JSON: send a number or null")


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a dict ({} for an empty body); BodyRefused when it is not one plain JSON object."""
    if not raw or raw.isspace():
        return {}
    if len(raw) > MAX_VALUES:  # below that it cannot hold more values than bytes: nothing to count
        values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
        if values > MAX_VALUES:
            raise BodyRefused(f"the JSON body has about {values:,} values; at most {MAX_VALUES:,} are accepted")
    try:
        body = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise BodyRefused("the JSON body is nested too deeply") from None
    except BodyRefused:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers over Python's digit limit
        raise BodyRefused(f"malformed JSON body: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise BodyRefused("the JSON body must be an object")
    return body


async def read_object(raw: bytes) -> dict[str, Any]:
    """`parse_object`, in a worker thread for a large body (the event loop keeps relaying other streams)."""
    if len(raw) < THREAD_BYTES:
        return parse_object(raw)
    return await asyncio.to_thread(parse_object, raw)


async def serialise(body: dict[str, Any], raw_size: int) -> bytes:
    """`dumps`, in a worker thread for a body that was large."""
    if raw_size < THREAD_BYTES:
        return dumps(body)
    return await asyncio.to_thread(dumps, body)


def dumps(body: dict[str, Any]) -> bytes:
    """`body` serialised again (after the gateway changed it), as strictly as it was read."""
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (RecursionError, ValueError) as exc:
        raise BodyRefused(f"the JSON body cannot be forwarded: {str(exc)[:200]}") from None


def add_member(raw: bytes, name: str, value: Any) -> bytes:
    """`raw`, a JSON object that has no member `name`, with `"name": value` appended before its closing brace: the
    rest stays byte for byte as the client sent it (cheaper than encoding the whole body again)."""
    head = raw.rstrip()[:-1].rstrip()  # without the closing brace (the body parsed as an object: it ends with one)
    sep = b"" if head.endswith(b"{") else b","
    return head + sep + json.dumps({name: value}, allow_nan=False).encode()[1:]


def model_name(value: Any) -> str | None:
    """The `model` of a request (None: not given); BodyRefused when it is not a plausible model name."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BodyRefused(f"`model` must be a string, not {type(value).__name__}")
    if len(value) > MAX_MODEL_NAME:
        raise BodyRefused(f"`model` is {len(value)} characters long; model names have at most {MAX_MODEL_NAME}")
    if _CONTROL.search(value):
        raise BodyRefused("`model` contains control characters")
    return value
