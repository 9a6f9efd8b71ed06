#!/usr/bin/env python3
"""Minimal streaming relay, candidate (c): a raw asyncio HTTP/1.1 server and a pooled raw asyncio client (stdlib).

Each request is parsed (head + content-length body) and sent on a pooled upstream connection; the upstream's response
bytes (head and chunked framing included) are written to the client as they arrive, untouched; the chunked framing
is only followed to know where the response ends. A lower bound for what Python can do here, not a server to ship:
no header rewriting, no limits, no backpressure. Bench-only (bench/bench_proxy_stacks.py).

  python relay_asyncio.py PORT UPSTREAM_PORT [--uvloop]      prints "ready PORT" once listening
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

POOL: list[Upstream] = []


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; relays one response at a time to `sink`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sink: asyncio.Transport | None = None
        self.on_done: Callable[[], None] | None = None
        self.head = b""
        self.in_head = True
        self.chunked = False
        self.left = 0  # body bytes (content-length) or bytes of the current chunk + CRLF still to pass
        self.line = b""  # partial chunk-size line
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in POOL:
            POOL.remove(self)
        if self.sink is not None:
            self.sink.close()

    def begin(self, data: bytes, sink: asyncio.Transport, on_done: Callable[[], None]) -> None:
        self.sink, self.on_done = sink, on_done
        self.head, self.in_head, self.chunked, self.left, self.line = b"", True, False, 0, b""
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.write(data)
        self._advance(data)

    def _advance(self, data: bytes) -> None:
        i = 0
        if self.in_head:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.head[:end].lower()
            data, self.in_head = self.head[end + 4:], False
            self.chunked = b"transfer-encoding: chunked" in head
            if not self.chunked:
                j = head.find(b"content-length:")
                self.left = int(head[j + 15:head.find(b"\r\n", j) if head.find(b"\r\n", j) > 0 else None]) \
                    if j >= 0 else 0
        if not self.chunked:
            self.left -= len(data)
            if self.left <= 0:
                self._finish()
            return
        n = len(data)
        while i < n:
            if self.left:
                take = min(self.left, n - i)
                self.left -= take
                i += take
                continue
            j = data.find(b"\r\n", i)
            if j < 0:
                self.line += data[i:]
                return
            size = int((self.line + data[i:j]).split(b";")[0], 16)
            self.line = b""
            i = j + 2
            if size == 0:  # last chunk: its trailing CRLF (no trailers from vLLM)
                self._finish()
                return
            self.left = size + 2

    def _finish(self) -> None:
        done, self.sink, self.on_done = self.on_done, None, None
        if not self.closed:
            POOL.append(self)
        if done is not None:
            done()


class Downstream(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.current: Upstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.current is not None and self.current.transport is not None:
            self.current.sink = None
            self.current.transport.close()  # the client went away: abort the upstream request

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        if self.busy:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end]
        low = head.lower()
        j = low.find(b"content-length:")
        length = int(low[j + 15:low.find(b"\r\n", j) if low.find(b"\r\n", j) > 0 else None]) if j >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        request, self.buf = self.buf[:end + 4 + length], self.buf[end + 4 + length:]
        self.busy = True
        if POOL:
            self._send(POOL.pop(), request)
        else:
            asyncio.get_running_loop().create_task(self._connect(request))

    async def _connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(Upstream, "127.0.0.1", self.upstream_port)
        self._send(up, request)

    def _send(self, up: Upstream, request: bytes) -> None:
        assert self.transport is not None
        self.current = up
        up.begin(request, self.transport, self._done)

    def _done(self) -> None:
        self.busy, self.current = False, None
        self._next()


async def main(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Downstream(upstream_port), "127.0.0.1", port, backlog=1024)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--uvloop" in args:
        import uvloop

        uvloop.install()
    try:
        asyncio.run(main(int(args[0]), int(args[1])))
    except KeyboardInterrupt:
        pass
