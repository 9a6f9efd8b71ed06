#!/usr/bin/env python3
"""A minimal asyncio OpenAI-style streaming server (stdlib only), fast enough to load-test the bench client.

Not the threaded fake_vllm: one event loop, an asyncio Protocol, HTTP/1.1 keep-alive, chunked SSE, and responses
built once per distinct request body, so the server costs little next to the client it measures. Serves
POST /v1/chat/completions (streamed: N content chunks, a usage chunk when asked, [DONE]) and GET /metrics with
vLLM's token counters.

  python fast_sse.py PORT [--tokens N] [--delay-ms D]     prints "ready PORT" once listening
Environment: FAST_SSE_FAIL_EVERY=K answers every K-th request with HTTP 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

STATE = {"prompt": 0, "gen": 0, "n": 0}
FAIL_EVERY = int(os.environ.get("FAST_SSE_FAIL_EVERY", "0") or 0)
CACHE: dict[bytes, tuple[list[bytes], int, int]] = {}  # body -> (response pieces, prompt tokens, output tokens)
FAILURE = (b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: 55\r\n\r\n"
           b'{"error": {"message": "injected failure", "code": 500}}')


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def build(body: bytes, tokens: int) -> tuple[list[bytes], int, int]:
    """The response to a chat request, as pieces to send (one piece per token when there is a delay)."""
    req = json.loads(body)
    n = min(tokens, int(req.get("max_tokens") or tokens))
    prompt = sum(len(str(m.get("content", "")).split()) for m in req.get("messages", []))
    pieces = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
              + chunk(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')]
    pieces += [chunk(b'data: {"choices":[{"index":0,"delta":{"content":"t%d "}}]}\n\n' % i) for i in range(n)]
    tail = chunk(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n')
    if (req.get("stream_options") or {}).get("include_usage"):
        usage = json.dumps({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                                      "total_tokens": prompt + n}}).encode()
        tail += chunk(b"data: " + usage + b"\n\n")
    pieces.append(tail + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return pieces, prompt, n


class Server(asyncio.Protocol):
    def __init__(self, tokens: int, delay: float) -> None:
        self.tokens, self.delay = tokens, delay
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.queue: list[tuple[list[bytes], int, int]] = []
        self.sending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            i = head.lower().find(b"content-length:")
            if i >= 0:
                length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.handle(head, body)

    def handle(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        if head.startswith(b"GET /metrics "):
            text = (f'vllm:prompt_tokens_total{{model_name="fast"}} {float(STATE["prompt"])}\n'
                    f'vllm:generation_tokens_total{{model_name="fast"}} {float(STATE["gen"])}\n').encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(text), text))
            return
        if not head.startswith(b"POST /v1/chat/completions "):
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            return
        STATE["n"] += 1
        if FAIL_EVERY and STATE["n"] % FAIL_EVERY == 0:
            self.transport.write(FAILURE)
            return
        cached = CACHE.get(body)
        if cached is None:
            cached = CACHE[body] = build(body, self.tokens)
        pieces, prompt, n = cached
        STATE["prompt"] += prompt
        STATE["gen"] += n
        if not self.delay:
            self.transport.write(b"".join(pieces))
        else:
            asyncio.get_running_loop().create_task(self.slow(pieces))

    async def slow(self, pieces: list[bytes]) -> None:
        assert self.transport is not None
        for piece in pieces[:-1]:
            self.transport.write(piece)
            await asyncio.sleep(self.delay)
        self.transport.write(pieces[-1])


async def main(port: int, tokens: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Server(tokens, delay), "127.0.0.1", port, backlog=1024)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    port = int(args[0])
    tokens = int(args[args.index("--tokens") + 1]) if "--tokens" in args else 8
    delay = float(args[args.index("--delay-ms") + 1]) / 1000 if "--delay-ms" in args else 0.0
    try:
        asyncio.run(main(port, tokens, delay))
    except KeyboardInterrupt:
        pass
