#!/usr/bin/env python3
"""Minimal streaming relay, candidate (b): uvicorn + Starlette + one long-lived httpx.AsyncClient (aiter_raw).

Any method and path is forwarded to the upstream; the response body is relayed as it arrives (aiter_raw: raw body
bytes, no SSE parsing). With --client aiohttp the upstream client is an aiohttp ClientSession instead (iter_any), to
tell the server's cost from the client's. Bench-only (bench/bench_proxy_stacks.py), not the gateway.

  python relay_starlette.py PORT UPSTREAM_PORT [--loop asyncio|uvloop] [--http h11|httptools] [--client aiohttp]
                                                               prints "ready PORT" once listening
"""

from __future__ import annotations

import contextlib
import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "trailer", "upgrade",
       "proxy-connection", "content-encoding"}


def build_aiohttp(upstream: str, port: int) -> Starlette:
    import aiohttp

    state: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
        async with aiohttp.ClientSession(upstream, connector=conn, auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=None, connect=10)) as session:
            state["session"] = session
            print(f"ready {port}", flush=True)
            yield

    async def relay(request: Request) -> StreamingResponse:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        cm = state["session"].request(request.method, request.url.path + (f"?{request.url.query}"
                                      if request.url.query else ""), data=body, headers=headers)
        up = await cm.__aenter__()
        out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}

        async def close() -> None:
            await cm.__aexit__(None, None, None)

        return StreamingResponse(up.content.iter_any(), status_code=up.status, headers=out,
                                 background=BackgroundTask(close))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/{tail:path}", relay, methods=methods)], lifespan=lifespan)


def build(upstream: str, port: int) -> Starlette:
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=512, keepalive_expiry=4.0)
        async with httpx.AsyncClient(base_url=upstream, limits=limits, trust_env=False,
                                     timeout=httpx.Timeout(None, connect=10.0)) as client:
            state["client"] = client
            print(f"ready {port}", flush=True)
            yield

    async def relay(request: Request) -> StreamingResponse:
        client = state["client"]
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        req = client.build_request(request.method, request.url.path, params=request.url.query or None,
                                   content=body, headers=headers)
        up = await client.send(req, stream=True)
        out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
        if up.headers.get("content-type", "").startswith("text/event-stream"):
            out["X-Accel-Buffering"] = "no"
        return StreamingResponse(up.aiter_raw(), status_code=up.status_code, headers=out,
                                 background=BackgroundTask(up.aclose))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/{tail:path}", relay, methods=methods)], lifespan=lifespan)


if __name__ == "__main__":
    args = sys.argv[1:]
    loop = args[args.index("--loop") + 1] if "--loop" in args else "auto"
    http = args[args.index("--http") + 1] if "--http" in args else "auto"
    port = int(args[0])
    make = build_aiohttp if "--client" in args and args[args.index("--client") + 1] == "aiohttp" else build
    uvicorn.run(make(f"http://127.0.0.1:{int(args[1])}", port), host="127.0.0.1", port=port, loop=loop, http=http,
                log_level="warning", access_log=False, backlog=1024, timeout_keep_alive=30)
