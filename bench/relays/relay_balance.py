#!/usr/bin/env python3
"""Streaming relay in front of several replicas, choosing each request's replica with the gateway's policy
(sage_llm.gateway.balance) or plain round robin. Bench-only (bench/bench_routing.py): the gateway's own hop, the
relay of bench/relays/relay_aiohttp.py, plus the JSON parse and the choice, until the gateway routes across replicas
itself. The chosen replica is named in `x-sage-llm-engine` (as the gateway does).

  python relay_balance.py PORT --upstream PORT [--upstream PORT ...] [--policy affinity|round_robin]
  prints "ready PORT" once listening; GET /health answers 200 itself
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from relay_aiohttp import HOP, serve  # beside this file

from sage_llm.gateway import balance


def app(upstreams: list[int], policy: str) -> web.Application:
    application = web.Application(client_max_size=16 * 1024 * 1024)
    names = [f"replica-{port}" for port in upstreams]
    url = {n: f"http://127.0.0.1:{port}" for n, port in zip(names, upstreams, strict=True)}
    outstanding = dict.fromkeys(names, 0)
    turn = itertools.cycle(names)

    async def start(app: web.Application) -> None:
        conn = TCPConnector(limit=0, keepalive_timeout=4.0, ttl_dns_cache=None)
        app["session"] = ClientSession(connector=conn, timeout=ClientTimeout(total=None, connect=10),
                                       auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    def pick(body: bytes, headers: Any) -> str:
        if policy == "round_robin":
            return next(turn)
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        replicas = [balance.Replica(n, outstanding=outstanding[n], capacity=256) for n in names]
        choice = balance.choose(replicas, doc if isinstance(doc, dict) else None, headers)
        assert choice is not None
        return choice.replica.engine

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        name = pick(body, request.headers)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        session: ClientSession = request.app["session"]
        outstanding[name] += 1
        try:
            async with session.request(request.method, url[name] + request.rel_url.path_qs, data=body,
                                       headers=headers) as up:
                resp = web.StreamResponse(status=up.status,
                                          headers={k: v for k, v in up.headers.items() if k.lower() not in HOP})
                resp.headers["x-sage-llm-engine"] = name
                await resp.prepare(request)
                async for data in up.content.iter_any():
                    await resp.write(data)
                await resp.write_eof()
                return resp
        finally:
            outstanding[name] -= 1

    application.on_startup.append(start)
    application.on_cleanup.append(stop)
    application.router.add_get("/health", health)
    application.router.add_route("*", "/{tail:.*}", relay)
    return application


async def main(port: int, upstreams: list[int], policy: str) -> None:
    await serve(app(upstreams, policy), port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--upstream", type=int, action="append", required=True)
    parser.add_argument("--policy", choices=("affinity", "round_robin"), default="affinity")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.port, args.upstream, args.policy))
    except KeyboardInterrupt:
        pass
