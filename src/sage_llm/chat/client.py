"""HTTP client for OpenAI-compatible chat servers (vLLM, or any cloud API): streaming SSE and error mapping.

No Typer, no Rich, no printing. `stream_chat()` yields text pieces as they arrive and fills a `ChatResult` (text,
usage, time to first token, tokens/s). Leaving the `with` block early (Ctrl-C, `close()`) closes the HTTP connection,
so the engine sees the disconnect and aborts the request.

Server errors become one-line `SageLLMError`s:
  404 unknown model  -> ModelNotFound, listing the served models
  401 bad key        -> AuthFailed
  400 too long       -> ContextTooLong, with the engine's max model length
  refused / dropped  -> ServerUnreachable (`retryable`: the chat may switch to the cloud)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from sage_llm.core.errors import SageLLMError

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 300.0  # between two bytes of a reply; a CPU engine can be slow to start a long answer


class ChatError(SageLLMError):
    """A chat request failed. `retryable`: the server is gone or broke (a fallback server may answer instead)."""

    retryable = False


class ServerUnreachable(ChatError):
    """Connection refused, reset, timed out or dropped mid-stream."""

    retryable = True


class ServerFailed(ChatError):
    """5xx, or an error frame in the middle of a stream."""

    retryable = True


class ModelNotFound(ChatError):
    exit_code = 2


class AuthFailed(ChatError):
    pass


class ContextTooLong(ChatError):
    pass


class BadRequest(ChatError):
    exit_code = 2


@dataclass
class Endpoint:
    """Where a chat request goes. `label` names it in messages, e.g. "local engine 'qwen'" or "cloud API"."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    label: str = "server"
    key_hint: str | None = None  # how to fix a 401, e.g. "set SAGE_CHAT_API_KEY"
    down_hint: str | None = None  # how to fix a refused connection, e.g. "sage-llm start MODEL"
    max_model_len: int | None = None

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def headers(self) -> dict[str, str]:
        h = {"Accept": "text/event-stream, application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


@dataclass
class ChatResult:
    parts: list[str] = field(default_factory=list)  # the text pieces, joined by `text` (no quadratic appends)
    model: str | None = None
    usage: dict[str, int] | None = None
    finish_reason: str | None = None
    started: float = 0.0  # monotonic, just before the request was sent
    first_token_at: float | None = None
    ended: float | None = None
    chunks: int = 0  # content pieces received
    cancelled: bool = False

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def completion_tokens(self) -> int | None:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return self.chunks or None

    @property
    def prompt_tokens(self) -> int | None:
        if self.usage and isinstance(self.usage.get("prompt_tokens"), int):
            return self.usage["prompt_tokens"]
        return None

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed: completion tokens after the first one, over the time since the first one."""
        n = self.completion_tokens
        if n is None or self.first_token_at is None or self.ended is None:
            return None
        span = self.ended - self.first_token_at
        if n <= 1 or span <= 0:
            return None
        return (n - 1) / span


def make_client(timeout_s: float = READ_TIMEOUT_S, base_url: str | None = None) -> httpx.Client:
    """An httpx client. For a plain-http base URL no TLS trust store is loaded (that costs 30-200 ms, all of it before
    the first token), and redirects are not followed, so nothing can lead it to an unverified https server."""
    tls = base_url is None or not base_url.startswith("http://")
    return httpx.Client(timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S), follow_redirects=tls,
                        verify=tls, trust_env=True)


def _loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def build_request(messages: list[dict[str, str]], model: str | None, stream: bool, temperature: float | None,
                  max_tokens: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": messages, "stream": stream}
    if model:
        body["model"] = model
    if stream:
        body["stream_options"] = {"include_usage": True}
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def list_models(endpoint: Endpoint, client: httpx.Client | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
    """GET /models; [] when it cannot be read."""
    own = client is None
    client = client or make_client(timeout)
    try:
        r = client.get(endpoint.url("/models"), headers=endpoint.headers(), timeout=timeout)
        if r.status_code != 200:
            return []
        data = r.json().get("data")
        return [m for m in data or [] if isinstance(m, dict)]
    except (httpx.HTTPError, ValueError, AttributeError):
        return []
    finally:
        if own:
            client.close()


def _error_message(body: bytes | str) -> str:
    """The `message` of an OpenAI/vLLM error body (`{"error": {...}}`, `{"object": "error", ...}`, `{"detail"}`)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:300] or "(no message)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or data.get("detail")
            if msg:
                return " ".join(str(msg).split())[:500]
        elif isinstance(err, str):
            return err[:500]
    return " ".join(text.split())[:300]


MAX_LEN_RE = re.compile(r"maximum (?:context|model) length is (\d+)", re.IGNORECASE)
REQUESTED_RE = re.compile(r"(\d+)\s+(?:input\s+|prompt\s+)?tokens", re.IGNORECASE)
TOO_LONG_RE = re.compile(r"context length|too long|max_model_len|maximum model length|longer than", re.IGNORECASE)


def map_http_error(status: int, body: bytes, endpoint: Endpoint, model: str | None,
                   client: httpx.Client | None = None) -> ChatError:
    msg = _error_message(body)
    where = f"{endpoint.label} at {endpoint.base_url}"
    if status == 404:
        if "model" in msg.lower() or model:
            served = [str(m.get("id")) for m in list_models(endpoint, client)]
            listing = ", ".join(served) if served else "none could be listed"
            return ModelNotFound(f"model {model!r} is not served by {where}; it serves: {listing}",
                                 hint="pick one with --model NAME (or /model NAME in the chat)")
        return ChatError(f"{where} answered 404 for /chat/completions: {msg}",
                         hint="check the base URL: it should end in /v1")
    if status in (401, 403):
        return AuthFailed(f"{where} refused the API key ({status}): {msg}",
                          hint=endpoint.key_hint or "check the API key")
    if status in (400, 413, 422) and TOO_LONG_RE.search(msg):
        m = MAX_LEN_RE.search(msg)
        limit = int(m.group(1)) if m else endpoint.max_model_len
        if limit is None:
            for card in list_models(endpoint, client):
                if card.get("id") == model and isinstance(card.get("max_model_len"), int):
                    limit = card["max_model_len"]
        req = REQUESTED_RE.search(msg[m.end():] if m else msg)
        need = f" (this request needs {req.group(1)})" if req else ""
        size = f"the engine's max model length is {limit} tokens" if limit else f"the server says: {msg}"
        return ContextTooLong(f"the conversation is too long for {model or 'the model'}: {size}{need}",
                              hint="/clear the history, shorten the prompt or --max-tokens, or restart the engine "
                                   "with a larger --max-model-len")
    if status >= 500:
        return ServerFailed(f"{where} failed ({status}): {msg}",
                            hint=endpoint.down_hint or "try again; see the server's logs")
    if status == 429:
        return ChatError(f"{where} is rate limiting requests (429): {msg}", hint="wait and try again")
    return BadRequest(f"{where} rejected the request ({status}): {msg}", hint="check --model, --temperature and "
                      "--max-tokens")


def _unreachable(exc: Exception, endpoint: Endpoint, during: str) -> ServerUnreachable:
    where = f"{endpoint.label} at {endpoint.base_url}"
    if isinstance(exc, httpx.ConnectError):
        refused = "refused" in str(exc).lower() or "errno 111" in str(exc).lower()
        if refused and _loopback(endpoint.base_url):
            what = f"{where} is not running (connection refused)"
        else:
            what = f"cannot connect to {where}: {exc}"
    elif isinstance(exc, httpx.TimeoutException):
        what = f"{where} did not answer in time ({type(exc).__name__})"
    else:
        what = f"{where} dropped the connection {during}: {exc or type(exc).__name__}"
    return ServerUnreachable(what, hint=endpoint.down_hint or "check the server")


class ChatStream:
    """One streamed (or not) chat completion. Use as a context manager and iterate for text pieces.

    `result` is filled as the pieces arrive. Closing early (break, exception, KeyboardInterrupt) closes the
    connection, which is how vLLM learns to abort the request.
    """

    def __init__(self, client: httpx.Client, endpoint: Endpoint, messages: list[dict[str, str]],
                 model: str | None = None, stream: bool = True, temperature: float | None = None,
                 max_tokens: int | None = None, extra_body: dict[str, Any] | None = None) -> None:
        self.client = client
        self.endpoint = endpoint
        self.model = model or endpoint.model
        self.stream = stream
        self.body = build_request(messages, self.model, stream, temperature, max_tokens)
        self.body.update(extra_body or {})  # server-specific sampling fields, e.g. vLLM's top_k or ignore_eos
        self.result = ChatResult(model=self.model)
        self._cm: Any = None
        self._resp: httpx.Response | None = None

    def __enter__(self) -> ChatStream:
        self.result.started = time.monotonic()
        try:
            self._cm = self.client.stream("POST", self.endpoint.url("/chat/completions"), json=self.body,
                                          headers=self.endpoint.headers())
            self._resp = self._cm.__enter__()
        except httpx.HTTPError as exc:
            raise _unreachable(exc, self.endpoint, "before answering") from exc
        resp = self._resp
        if resp.status_code != 200:
            try:
                body = resp.read()
            except httpx.HTTPError:
                body = b""
            self.close()
            raise map_http_error(resp.status_code, body, self.endpoint, self.model, self.client)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            try:
                cm.__exit__(None, None, None)
            except httpx.HTTPError:
                pass
        if self.result.ended is None:
            self.result.ended = time.monotonic()

    def __iter__(self) -> Iterator[str]:
        assert self._resp is not None, "use `with ChatStream(...) as s:`"
        try:
            if self.stream:
                yield from self._iter_sse(self._resp)
            else:
                yield from self._iter_whole(self._resp)
        except httpx.HTTPError as exc:
            raise _unreachable(exc, self.endpoint, "in the middle of the reply") from exc
        self.result.ended = time.monotonic()

    def _piece(self, text: str) -> str:
        r = self.result
        if r.first_token_at is None:
            r.first_token_at = time.monotonic()
        r.chunks += 1
        r.parts.append(text)
        return text

    def _iter_whole(self, resp: httpx.Response) -> Iterator[str]:
        data = json.loads(resp.read())
        self._meta(data)
        choices = data.get("choices") or []
        if choices:
            msg = choices[0].get("message") or {}
            self.result.finish_reason = choices[0].get("finish_reason")
            content = msg.get("content") or ""
            if content:
                yield self._piece(content)
                self.result.chunks = 1

    def _meta(self, data: dict[str, Any]) -> None:
        if data.get("model"):
            self.result.model = data["model"]
        if isinstance(data.get("usage"), dict):
            self.result.usage = {k: v for k, v in data["usage"].items() if isinstance(v, int)}

    def _iter_sse(self, resp: httpx.Response) -> Iterator[str]:
        saw_done = False
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, `: keep-alive` comments, `event:` lines
            payload = line[5:].strip()
            if payload == "[DONE]":
                saw_done = True
                break
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            if "error" in data or data.get("object") == "error":
                msg = _error_message(payload)
                raise ServerFailed(f"{self.endpoint.label} at {self.endpoint.base_url} failed in the middle of the "
                                   f"reply: {msg}", hint=self.endpoint.down_hint)
            self._meta(data)
            for choice in data.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                content = delta.get("content")
                if content:
                    yield self._piece(content)
                if choice.get("finish_reason"):
                    self.result.finish_reason = choice["finish_reason"]
        if not saw_done and self.result.finish_reason is None:
            raise ServerUnreachable(f"{self.endpoint.label} at {self.endpoint.base_url} ended the reply early "
                                    "(the stream stopped with no end marker)", hint=self.endpoint.down_hint)


@dataclass
class TurnStats:
    """What one reply cost, as shown after it and in /stats."""

    source: str
    model: str | None
    ttft_s: float | None
    tokens_per_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    elapsed_s: float
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, result: ChatResult, source: str) -> TurnStats:
        end = result.ended or time.monotonic()
        return cls(source=source, model=result.model, ttft_s=result.ttft_s, tokens_per_s=result.tokens_per_s,
                   prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                   elapsed_s=end - result.started, cancelled=result.cancelled)

    def line(self) -> str:
        parts = []
        parts.append(f"ttft {self.ttft_s:.2f} s" if self.ttft_s is not None else "ttft n/a")
        parts.append(f"{self.tokens_per_s:.1f} tokens/s" if self.tokens_per_s is not None else "tokens/s n/a")
        p = "?" if self.prompt_tokens is None else str(self.prompt_tokens)
        c = "?" if self.completion_tokens is None else str(self.completion_tokens)
        parts.append(f"{p} prompt + {c} completion tokens")
        parts.append(f"{self.elapsed_s:.2f} s")
        if self.cancelled:
            parts.append("cancelled")
        return " · ".join(parts)
