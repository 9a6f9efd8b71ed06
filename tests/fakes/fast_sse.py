#!/usr/bin/env python3
"""A minimal asyncio OpenAI-style streaming server (stdlib only), fast enough to load-test the bench client.

Not the threaded fake_vllm: one event loop, an asyncio Protocol, HTTP/1.1 keep-alive, chunked SSE, and responses
built once per distinct request body, so the server costs little next to the client it measures. Serves
POST /v1/chat/completions (streamed: N content chunks, a usage chunk when asked, [DONE]), GET /metrics with
vLLM's token counters, and, so that sage-llm (status, the gateway) takes it for a vLLM server, GET /health,
/v1/models (owned_by "vllm") and /version.

  python fast_sse.py PORT [--tokens N] [--delay-ms D]     prints "ready PORT" once listening
  python fast_sse.py serve MODEL --port P [--host H] [--served-model-name NAME] [other vLLM flags, ignored]
      the way sage-llm runs vLLM (SAGE_LLM_VLLM="python fast_sse.py"); tokens and delay from the environment
Environment: FAST_SSE_FAIL_EVERY=K answers every K-th request with HTTP 500; FAST_SSE_TOKENS=N (default 8) and
FAST_SSE_DELAY_MS=D (default 0) for the `serve` form.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

STATE = {"prompt": 0, "gen": 0, "n": 0}
MODEL = {"id": "fast", "root": "fast"}
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
        if head.startswith(b"GET "):
            self.get(head.split(b" ", 2)[1].split(b"?")[0])
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

    def get(self, path: bytes) -> None:
        assert self.transport is not None
        ctype = b"application/json"
        if path == b"/metrics":
            name = MODEL["id"]
            text = (f'vllm:prompt_tokens_total{{model_name="{name}"}} {float(STATE["prompt"])}\n'
                    f'vllm:generation_tokens_total{{model_name="{name}"}} {float(STATE["gen"])}\n').encode()
            ctype = b"text/plain"
        elif path == b"/health":
            text = b""
        elif path == b"/v1/models":
            text = json.dumps({"object": "list", "data": [{
                "id": MODEL["id"], "object": "model", "created": 0, "owned_by": "vllm", "root": MODEL["root"],
                "parent": None, "max_model_len": 2048}]}).encode()
        elif path == b"/version":
            text = b'{"version": "0.32.0+fast-sse"}'
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                             % (ctype, len(text), text))

    async def slow(self, pieces: list[bytes]) -> None:
        assert self.transport is not None
        for piece in pieces[:-1]:
            self.transport.write(piece)
            await asyncio.sleep(self.delay)
        self.transport.write(pieces[-1])


async def main(port: int, tokens: int, delay: float, host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Server(tokens, delay), host, port, backlog=1024)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


def opt(args: list[str], name: str, default: str) -> str:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


if __name__ == "__main__":
    args = sys.argv[1:]
    host = "127.0.0.1"
    if args and args[0] in ("--version", "-v"):
        print("0.32.0+fast-sse")
        sys.exit(0)
    if args and args[0] == "serve":  # vLLM's command line
        if len(args) < 2 or args[1].startswith("-"):
            print("usage: fast_sse.py serve MODEL --port P", file=sys.stderr)
            sys.exit(2)
        MODEL["root"] = args[1]
        MODEL["id"] = opt(args, "--served-model-name", args[1])
        port = int(opt(args, "--port", "8000"))
        host = opt(args, "--host", "127.0.0.1") or "127.0.0.1"
        tokens = int(os.environ.get("FAST_SSE_TOKENS", "8") or 8)
        delay = float(os.environ.get("FAST_SSE_DELAY_MS", "0") or 0) / 1000
    else:
        port = int(args[0])
        tokens = int(opt(args, "--tokens", "8"))
        delay = float(opt(args, "--delay-ms", "0")) / 1000
    try:
        asyncio.run(main(port, tokens, delay, host))
    except KeyboardInterrupt:
        pass
