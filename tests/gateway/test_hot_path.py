"""The per-request path of a proxied stream, as an upstream sees it and as a client sees it (issue 23's hop):
the bytes the engine receives, and when the response head leaves.

An upstream of the test's own (a raw socket server on 127.0.0.1, behind `--upstream`) records every request and
answers with a chunked SSE stream whose pieces the test releases one by one."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"hello"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream:
    """One connection at a time; each request's raw body is kept, and its answer is sent in steps: `first` (sent at
    once), then the rest once `release` is set."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.bodies: list[bytes] = []
        self.release = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(rest) < length:
            rest += conn.recv(65536)
        self.bodies.append(rest[:length])
        conn.sendall(self.first)
        self.release.wait(30)
        tail = chunk(TOKEN)
        if b'"include_usage"' in rest:
            tail += chunk(USAGE)
        conn.sendall(tail + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.fixture
def upstream() -> Any:
    made: list[Upstream] = []

    def make(first: bytes) -> Upstream:
        made.append(Upstream(first))
        return made[-1]

    yield make
    for u in made:
        u.close()


def request(port: int, body: bytes, key: str | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + auth
              + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return s


def read_until(s: socket.socket, needle: bytes) -> bytes:
    got = b""
    while needle not in got:
        data = s.recv(65536)
        assert data, f"connection closed before {needle!r}: {got!r}"
        got += data
    return got


def test_the_usage_option_is_added_to_the_bytes_the_client_sent(gateway, upstream, home: Path) -> None:
    """A keyed stream gets `stream_options.include_usage` added for accounting. The rest of the body reaches the
    engine byte for byte as the client sent it (its spacing, number spelling and raw UTF-8), not re-encoded."""
    from sage_llm.gateway import keys

    _, secret = keys.add("alice")
    up = upstream(HEAD + chunk(ROLE))
    up.release.set()
    gw = gateway(upstreams=[f"cap=http://127.0.0.1:{up.port}/v1"])
    body = '{"model": "cap", "stream":true, "temperature": 0.50,\n "messages": [{"role": "user", "content": "é ü"}]}'
    with request(gw.gw.opts.port, body.encode(), secret) as s:
        answer = read_until(s, b"[DONE]")
    assert up.bodies == [body[:-1].encode() + b',"stream_options": {"include_usage": true}}']
    assert b'"usage"' not in answer  # the chunk the gateway asked for is not shown
    assert json.loads(up.bodies[0])["stream_options"] == {"include_usage": True}


def test_a_client_that_asked_for_usage_options_keeps_its_own(gateway, upstream, home: Path) -> None:
    """A body that names stream_options itself is re-encoded with include_usage set (never a second member)."""
    from sage_llm.gateway import keys

    _, secret = keys.add("alice")
    up = upstream(HEAD + chunk(ROLE))
    up.release.set()
    gw = gateway(upstreams=[f"cap=http://127.0.0.1:{up.port}/v1"])
    body = {"model": "cap", "stream": True, "stream_options": {"continuous_usage_stats": False},
            "messages": [{"role": "user", "content": "x"}]}
    with request(gw.gw.opts.port, json.dumps(body).encode(), secret) as s:
        read_until(s, b"[DONE]")
    sent = up.bodies[0]
    assert sent.count(b'"stream_options"') == 1
    assert json.loads(sent)["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}


def test_the_head_leaves_with_the_first_event_the_engine_sent_with_its_own(gateway, upstream) -> None:
    """The engine's head and first event arrive together: the client gets both in one write (one wake-up)."""
    up = upstream(HEAD + chunk(ROLE))
    gw = gateway(upstreams=[f"cap=http://127.0.0.1:{up.port}/v1"])
    body = json.dumps({"model": "cap", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    with request(gw.gw.opts.port, body) as s:
        first = s.recv(65536)  # one segment: what the gateway wrote at once
        up.release.set()
        rest = read_until(s, b"[DONE]")
    assert first.startswith(b"HTTP/1.1 200")
    assert ROLE in first
    assert TOKEN in rest


def test_the_head_is_not_held_back_while_the_engine_is_silent(gateway, upstream) -> None:
    """An engine that sends its head and then nothing (prefill): the client has the 200 before any event."""
    up = upstream(HEAD)
    gw = gateway(upstreams=[f"cap=http://127.0.0.1:{up.port}/v1"])
    body = json.dumps({"model": "cap", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    with request(gw.gw.opts.port, body) as s:
        head = read_until(s, b"\r\n\r\n")  # the upstream holds its events until released
        assert head.startswith(b"HTTP/1.1 200")
        assert b"data:" not in head
        assert b"x-sage-llm-engine: cap" in head.lower()
        up.release.set()
        rest = head + read_until(s, b"[DONE]")
    assert ROLE not in rest
    assert TOKEN in rest
