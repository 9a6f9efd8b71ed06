#!/usr/bin/env python3
"""A minimal asyncio OpenAI-style streaming server (stdlib only), fast enough to load-test the bench client.

Not the threaded fake_vllm: one event loop, HTTP/1.1 keep-alive, chunked SSE. Serves POST /v1/chat/completions
(streamed: N content chunks, a usage chunk when asked, [DONE]) and GET /metrics with vLLM's token counters.

  python fast_sse.py PORT [--tokens N] [--delay-ms D]     prints "ready PORT" once listening
Environment: FAST_SSE_FAIL_EVERY=K answers every K-th request with HTTP 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

STATE = {"prompt": 0, "gen": 0, "n": 0}


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tokens: int, delay: float) -> None:
    fail_every = int(os.environ.get("FAST_SSE_FAIL_EVERY", "0"))
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].split(b" ", 2)
            length = 0
            for ln in lines[1:]:
                if ln[:15].lower() == b"content-length:":
                    length = int(ln[15:])
            body = await reader.readexactly(length) if length else b""
            if method == b"GET" and path == b"/metrics":
                text = (f'vllm:prompt_tokens_total{{model_name="fast"}} {float(STATE["prompt"])}\n'
                        f'vllm:generation_tokens_total{{model_name="fast"}} {float(STATE["gen"])}\n').encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(text), text))
                continue
            if method != b"POST" or path != b"/v1/chat/completions":
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                continue
            STATE["n"] += 1
            if fail_every and STATE["n"] % fail_every == 0:
                msg = b'{"error": {"message": "injected failure", "code": 500}}'
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(msg), msg))
                continue
            req = json.loads(body)
            n = min(tokens, int(req.get("max_tokens") or tokens))
            prompt = sum(len(str(m.get("content", "")).split()) for m in req.get("messages", []))
            out = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                   chunk(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')]
            for i in range(n):
                if delay:
                    writer.write(b"".join(out))
                    out.clear()
                    await writer.drain()
                    await asyncio.sleep(delay)
                out.append(chunk(b'data: {"choices":[{"index":0,"delta":{"content":"t%d "}}]}\n\n' % i))
            out.append(chunk(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'))
            if (req.get("stream_options") or {}).get("include_usage"):
                usage = json.dumps({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                                              "total_tokens": prompt + n}}).encode()
                out.append(chunk(b"data: " + usage + b"\n\n"))
            out.append(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            writer.write(b"".join(out))
            STATE["prompt"] += prompt
            STATE["gen"] += n
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int, tokens: int, delay: float) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, tokens, delay), "127.0.0.1", port, backlog=1024)
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
