"""Usage accounting for a shared gateway: per key and model, requests, prompt and completion tokens, errors.

Counts come from the engine's own `usage` (vLLM's token counts), never from guessing:
- non-streamed answers carry `usage` in their JSON body (read once the body has been relayed);
- streamed answers carry it in a last chunk (`"choices":[]`) when the request asks for
  `stream_options.include_usage`. The gateway asks for it when the client did not, and then drops that chunk from
  what the client sees. Cheaply: a chunk is searched (in C) for `"usage"` and only the SSE events holding it are
  parsed; an event split across reads is held back until its end (`\\n\\n`) arrives (a stream that breaks off
  mid-event loses that half event, which the client could not have parsed either).

Each finished request appends one JSON line to `<state dir>/gateway-usage.jsonl` (0600, one write on an O_APPEND
file: lines of concurrent gateways do not interleave), rotated at 32 MiB into .1 ... .5. `sage-llm gateway usage`
sums those files. The running gateway also keeps totals for Prometheus, labelled by key *name*.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_llm.core import paths
from sage_llm.core.errors import UsageError

FILE_NAME = "gateway-usage.jsonl"
ROTATE_BYTES = 32 * 1024 * 1024
KEEP = 5
BODY_CAP = 8 * 1024 * 1024  # a non-streamed answer larger than this is relayed but not parsed for usage
HOLD_CAP = 64 * 1024  # bytes of an unfinished SSE event held back at most
USAGE_MARK = b'"usage"'


_string = functools.lru_cache(maxsize=1024)(json.dumps)  # key names and model labels: a bounded set


def path(root: Path | None = None) -> Path:
    return (root or paths.home()) / FILE_NAME


class UsageLog:
    """The append-only file plus in-memory totals (Prometheus)."""

    def __init__(self, root: Path | None = None, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.path = path(root)
        self.rotate_bytes = rotate_bytes
        self.totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # req, prompt, compl, err
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            paths.ensure_home(self.path.parent)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.fchmod(self._fd, 0o600)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for n in range(KEEP - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.path.exists():
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def record(self, key: str, model: str, status: int, prompt: int, completion: int, stream: bool) -> None:
        error = status >= 400
        t = self.totals[(key, model)]
        t[0] += 1
        t[1] += prompt
        t[2] += completion
        t[3] += error
        # the line json.dumps(..., separators=(",", ":")) writes, formatted directly (a few us less per request)
        line = (f'{{"t":{round(time.time(), 3)!r},"key":{_string(key)},"model":{_string(model)},"status":{status:d},'
                f'"prompt_tokens":{prompt:d},"completion_tokens":{completion:d},'
                f'"stream":{"true" if stream else "false"},"error":{"true" if error else "false"}}}\n').encode()
        try:
            if self._size + len(line) > self.rotate_bytes:
                self._rotate()
            os.write(self._open(), line)
            self._size += len(line)
        except OSError:
            pass  # accounting must never fail a request; the in-memory totals still count it

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def render(self) -> str:
        """Prometheus counters labelled by key name and model."""
        from sage_llm.gateway.metrics import _labels

        names = (("requests", 0, "Requests per key and model."), ("prompt_tokens", 1, "Prompt tokens (engine usage)."),
                 ("completion_tokens", 2, "Completion tokens (engine usage)."), ("errors", 3, "Answers >= 400."))
        out: list[str] = []
        for name, i, help_ in names:
            out += [f"# HELP sage_llm_gateway_key_{name}_total {help_}",
                    f"# TYPE sage_llm_gateway_key_{name}_total counter"]
            for (key, model), t in sorted(self.totals.items()):
                out.append(f"sage_llm_gateway_key_{name}_total{_labels({'key': key, 'model': model})} {t[i]}")
        return "\n".join(out) + "\n"


class Meter:
    """One request's usage, read from the relayed bytes. `feed` returns what the client gets."""

    __slots__ = ("_body", "_done", "_held", "_size", "completion", "key", "model", "prompt", "sse", "strip")

    def __init__(self, key: str, model: str, strip: bool, done: Callable[[Meter, int, bool], None]) -> None:
        self.key, self.model, self.strip = key, model, strip
        self.prompt = self.completion = 0
        self._held = b""
        self._body: list[bytes] | None = None
        self._size = 0
        self._done = done
        self.sse = False

    def feed(self, chunk: bytes, sse: bool) -> bytes:
        self.sse = sse
        if sse and not self._held and USAGE_MARK not in chunk and chunk.endswith(b"\n\n"):
            return chunk  # the usual read: whole events, none with usage
        if not sse:
            if self._size <= BODY_CAP:
                (self._body if self._body is not None else self._start_body()).append(chunk)
                self._size += len(chunk)
            return chunk
        if self._held:
            chunk, self._held = self._held + chunk, b""
        if chunk.endswith(b"\n\n"):  # the usual read: whole events
            if USAGE_MARK not in chunk:
                return chunk
        else:
            last = chunk.rfind(b"\n\n")
            end = last + 2 if last != -1 else 0
            if len(chunk) - end < HOLD_CAP:
                chunk, self._held = chunk[:end], chunk[end:]  # an event cut between two reads: wait for its end
            if USAGE_MARK not in chunk:
                return chunk
        kept: list[bytes] = []
        pos = 0  # only the events around a `"usage"` are looked at (and our own usage chunk cut out)
        at = chunk.find(USAGE_MARK)
        while at != -1:
            before = chunk.rfind(b"\n\n", 0, at)
            after = chunk.find(b"\n\n", at)
            start, end = (before + 2 if before != -1 else 0), (after + 2 if after != -1 else len(chunk))
            if self._take(chunk[start:end]):
                kept.append(chunk[pos:start])
                pos = end
            at = chunk.find(USAGE_MARK, end)
        if not pos:
            return chunk
        kept.append(chunk[pos:])
        return b"".join(kept)

    def _start_body(self) -> list[bytes]:
        self._body = []
        return self._body

    def _take(self, event: bytes) -> bool:
        """Read the usage of one SSE event; True when it is the usage chunk we asked for (to drop)."""
        data = event.strip()
        if not data.startswith(b"data:"):
            return False
        try:
            obj = json.loads(data[5:])
        except ValueError:
            return False
        if not isinstance(obj, dict):
            return False
        self._usage(obj.get("usage"))
        return self.strip and obj.get("choices") == [] and obj.get("usage") is not None

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt = int(usage.get("prompt_tokens") or 0)
            self.completion = int(usage.get("completion_tokens") or 0)

    def finish(self, status: int) -> None:
        if self._body:
            try:
                obj = json.loads(b"".join(self._body))
                if isinstance(obj, dict):
                    self._usage(obj.get("usage"))
            except ValueError:
                pass
        self._done(self, status, self.sse)


# ------------------------------------------------------------------------------------------------ reading
def parse_since(raw: str | None) -> float | None:
    """Epoch seconds for `7d`, `12h`, `30m`; None for everything."""
    if raw is None:
        return None
    from sage_llm.gateway.options import parse_duration

    seconds = parse_duration(raw, "--since")
    return time.time() - seconds if seconds else None


def lines(root: Path | None = None) -> Iterator[dict[str, Any]]:
    base = path(root)
    for n in range(KEEP, 0, -1):
        yield from _lines(base.with_name(f"{base.name}.{n}"))
    yield from _lines(base)


def _lines(p: Path) -> Iterator[dict[str, Any]]:
    try:
        fh = p.open("rb")
    except FileNotFoundError:
        return
    with fh:
        for raw in fh:
            try:
                doc = json.loads(raw)
            except ValueError:
                continue  # a torn last line (power cut) is skipped, not fatal
            if isinstance(doc, dict):
                yield doc


@dataclass
class Row:
    key: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(since: float | None = None, by: str = "key", root: Path | None = None) -> list[Row]:
    """Totals grouped by key, by model, or by both (`key,model`)."""
    if by not in ("key", "model", "key,model"):
        raise UsageError(f"--by {by!r} is not a grouping", hint="key, model, or key,model")
    rows: dict[tuple[str, str], Row] = {}
    for d in lines(root):
        if since is not None and float(d.get("t", 0)) < since:
            continue
        k, m = str(d.get("key", "?")), str(d.get("model", "?"))
        group = (k if "key" in by else "*", m if "model" in by else "*")
        row = rows.setdefault(group, Row(*group))
        row.requests += 1
        row.prompt_tokens += int(d.get("prompt_tokens") or 0)
        row.completion_tokens += int(d.get("completion_tokens") or 0)
        row.errors += bool(d.get("error"))
    return sorted(rows.values(), key=lambda r: (r.key, r.model))
