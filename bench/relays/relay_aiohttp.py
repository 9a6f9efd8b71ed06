#!/usr/bin/env python3
"""Minimal streaming relay, candidate (a): aiohttp web server + one long-lived aiohttp ClientSession.

Any method and path is forwarded to the upstream; the response body is relayed as it arrives (iter_any: raw body
bytes, no SSE parsing). Bench-only (bench/bench_proxy_stacks.py, bench/bench_gateway.py), not the gateway.

  python relay_aiohttp.py PORT UPSTREAM_PORT [--uvloop]      prints "ready PORT" once listening
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "trailer", "upgrade",
       "proxy-connection", "content-encoding"}


def app(upstream: str) -> web.Application:
    application = web.Application(client_max_size=16 * 1024 * 1024)

    async def start(app: web.Application) -> None:
        # keep-alive below vLLM's 5 s so a reused connection is never one the server is closing
        conn = TCPConnector(limit=0, keepalive_timeout=4.0, ttl_dns_cache=None)
        app["session"] = ClientSession(upstream, connector=conn, timeout=ClientTimeout(total=None, connect=10),
                                       auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        session: ClientSession = request.app["session"]
        async with session.request(request.method, request.rel_url.path_qs, data=body, headers=headers) as up:
            resp = web.StreamResponse(status=up.status,
                                      headers={k: v for k, v in up.headers.items() if k.lower() not in HOP})
            if up.headers.get("content-type", "").startswith("text/event-stream"):
                resp.headers["X-Accel-Buffering"] = "no"
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp

    application.on_startup.append(start)
    application.on_cleanup.append(stop)
    application.router.add_route("*", "/{tail:.*}", relay)
    return application


async def main(port: int, upstream_port: int) -> None:
    await serve(app(f"http://127.0.0.1:{upstream_port}"), port)


async def serve(application: web.Application, port: int) -> None:
    """Serve on 127.0.0.1:port, say "ready PORT", run until cancelled."""
    runner = web.AppRunner(application, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    print(f"ready {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--uvloop" in args:
        import uvloop

        uvloop.install()
    try:
        asyncio.run(main(int(args[0]), int(args[1])))
    except KeyboardInterrupt:
        pass
