"""The gateway's HTTP application (aiohttp server and client): routes, checks and the streaming proxy.

The proxy relays the upstream's bytes chunk by chunk as they arrive (no SSE re-parsing, no buffering), through one
long-lived ClientSession whose keep-alive expiry (4 s) is below vLLM's 5 s. A client that disconnects cancels its
handler (handler_cancellation), which closes the upstream connection: vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import sys
import time
from typing import Any

import aiohttp
import yarl
from aiohttp import web

from sage_llm import __version__
from sage_llm.core.errors import SageLLMError
from sage_llm.gateway import bodies, engine_env, engines, instance, security
from sage_llm.gateway.access import Access, caller
from sage_llm.gateway.events import EventBus, sse_frame
from sage_llm.gateway.fairshare import Share
from sage_llm.gateway.machine import Refused, State
from sage_llm.gateway.metrics import Metrics
from sage_llm.gateway.options import VIRTUAL_MODELS, GatewayOptions
from sage_llm.gateway.router import Backend, GatewayError, Router
from sage_llm.gateway.usage import Meter, UsageLog
from sage_llm.gateway.webapi import WebAPI

KEEPALIVE_S = 4.0  # below vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s): no reuse of a connection the server closes
ENGINE_PATHS = ("/tokenize", "/detokenize", "/pooling", "/classify", "/score", "/rerank")  # vLLM, outside /v1
# upstream response headers that say what the relayed bytes mean (the body is relayed as is, still encoded)
RELAYED_HEADERS = ("Content-Encoding", "Retry-After")
# a proxied answer is the upstream's bytes served from the gateway's origin (where the panel keeps its key): whatever
# type the upstream claims, a browser must not run it as a page of that origin
RELAY_SAFETY = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   retry_after: float | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    headers = {**(headers or {}), **({"Retry-After": str(int(retry_after))} if retry_after else {})} or None
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status, headers=headers)


def from_gateway_error(exc: GatewayError) -> web.Response:
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.retry_after, exc.param)


class Gateway:
    def __init__(self, opts: GatewayOptions) -> None:
        self.opts = opts
        self.bus = EventBus()
        self.metrics = Metrics()
        self.router = Router(opts, self.bus, self.metrics, own_ports={opts.port})
        self.session: aiohttp.ClientSession | None = None
        self.started = time.time()
        self.api_key = opts.api_key()
        engine_env.keep_from_engines(opts.api_key_env)
        self.access = Access(self.api_key, required=not opts.loopback)  # keys and roles (access.py)
        self.share = Share(UsageLog(), opts.profiles)  # fair admission, per-key limits, usage (keyed callers only)
        self.stopped_engines: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.web = WebAPI(self)

    def _bg(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------------- app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.opts.max_body, middlewares=[self._checks])
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model:.+}", self.model_card)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/api/local-engine/status", self.local_status)
        r.add_get("/api/local-engine/models", self.local_models)
        r.add_post("/api/local-engine/start", self.local_start)
        r.add_post("/api/local-engine/stop", self.local_stop)
        r.add_get("/api/status", self.full_status)
        r.add_get("/api/gateway", self.gateway_info)
        r.add_get("/api/llm/status", self.llm_status)
        r.add_get("/api/events", self.events)
        self.web.register(app)  # the panel at / and the routes it uses beyond the seed's API (webapi.py)
        r.add_route("*", "/v1/{tail:.*}", self.proxy)
        for path in ENGINE_PATHS:
            r.add_post(path, self.proxy)
        app.on_response_prepare.append(self._cors)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        self.bus.loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S, enable_cleanup_closed=True,
                                         **_socket_factory())
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             cookie_jar=aiohttp.DummyCookieJar(),  # a relay keeps no cookies
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self.router.session = self.session
        await self.router.refresh()  # adopts the engines a previous gateway left running
        self.router.start_loops()
        self.bus.publish("gateway", state="ready", port=self.opts.port)

    async def _cleanup(self, app: web.Application) -> None:
        self.stopped_engines = await self.router.close(self.opts.stop_engines_on_exit)
        if self.session is not None:
            await self.session.close()
        self.share.usage.close()

    async def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if security.cors_allowed(origin, self.opts.allowed_origins) and origin is not None:
            for name, value in security.cors_headers(origin).items():
                response.headers.setdefault(name, value)

    @web.middleware
    async def _checks(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if security.is_preflight(request.method, request.headers):  # browsers send no key on a preflight
            if self.opts.loopback and not security.host_ok(request.headers.get("Host"), self.opts.host):
                return error_response(403, "Host is not this gateway (DNS rebinding protection)",
                                      code="forbidden_host")
            status, headers, why = security.preflight(request.headers, self.opts.allowed_origins)
            if why is not None:
                return error_response(status, why, code="forbidden_origin")
            return web.Response(status=status, headers=headers)
        refused = self.access.check(request) or security.check(  # keys and roles first (access.py), then
            request.method, request.headers, self.opts.host, self.opts.port, None,  # Host, Origin, Content-Type
            self.opts.allowed_origins, self.opts.loopback)
        if refused is not None:
            status, message, code = refused
            return error_response(status, message, "invalid_request_error" if status != 401 else
                                  "authentication_error", code)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return error_response(404, f"no route {request.method} {request.path}", code="not_found")
        except web.HTTPMethodNotAllowed:
            return error_response(405, f"method {request.method} not allowed on {request.path}",
                                  code="method_not_allowed")
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body is larger than {self.opts.max_body} bytes",
                                  code="request_too_large")
        except GatewayError as exc:
            return from_gateway_error(exc)

    # ------------------------------------------------------------------------------------------------- basics
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": "sage-llm-gateway", "version": __version__})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.access.visible(self.router.catalog())})

    async def model_card(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for card in self.access.visible(self.router.catalog()):
            if card["id"] == name or name in card.get("aliases", []):
                return web.json_response(card)
        return error_response(404, f"The model `{name}` does not exist here. Models: "
                              f"{', '.join(self.router.known_names(self.access.allows)) or 'none'}",
                              code="model_not_found",
                              param="model")

    async def prometheus(self, request: web.Request) -> web.Response:
        text = self.metrics.render(self.router.engines, self.router.queued)
        if self.share.usage.totals:
            text += self.share.usage.render()  # per key name and model (usage.py)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": __version__, "host": self.opts.host, "port": self.opts.port,
                "url": f"{self.opts.scheme}://{self.opts.host if ':' not in self.opts.host else f'[{self.opts.host}]'}:"
                       f"{self.opts.port}/v1",
                "uptime_s": round(time.time() - self.started, 1), "queued": self.router.queued,
                "options": self.opts.to_json(), "models": self.access.visible(self.router.catalog()),
                "access": {**self.access.describe(), "engines": self.share.describe()}}

    async def gateway_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info())

    # ------------------------------------------------------------------------------------------------- management
    async def local_status(self, request: web.Request) -> web.Response:
        return web.json_response(engines.local_engine_status(self.router.views))

    async def llm_status(self, request: web.Request) -> web.Response:
        """The shape SAGE Studio's frontend polls (GET /api/llm/status), for the gateway as its local LLM service."""
        cards = self.router.catalog()
        ready = [c for c in cards if c["state"] == "ready"]
        local = engines.local_engine_status(self.router.views)
        failed = [c for c in cards if c["state"] == "failed" and c.get("error")]
        info = self.info()
        return web.json_response({
            "running": True, "healthy": bool(ready), "service_type": "sage-llm-gateway",
            "model_name": local.get("model") or (ready[0]["id"] if ready else None), "base_url": info["url"],
            "is_local": True, "available_models": [c["id"] for c in cards],
            "details": {"ready": [c["id"] for c in ready], "local_engine": local, "queued": self.router.queued,
                        "version": __version__},
            "error": failed[0]["error"] if failed and not ready else None})

    async def full_status(self, request: web.Request) -> web.Response:
        doc = await asyncio.to_thread(engines.status_document)
        doc["gateway"] = {k: v for k, v in self.info().items() if k != "models"}
        return web.json_response(doc)

    async def local_models(self, request: web.Request) -> web.Response:
        cached = {m.repo_id: m for m in await asyncio.to_thread(engines.cached_models)}
        out = []
        for card in self.router.catalog():
            m = cached.get(card["id"])
            out.append({**card, "cached": m is not None, "size_on_disk": m.size_on_disk if m else None,
                        "context_length": m.context_length if m else None,
                        "quantization": m.quantization if m else None})
        return web.json_response({"object": "list", "models": out})

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            return await bodies.read_object(await request.read())
        except bodies.BodyRefused as exc:
            raise GatewayError(400, str(exc), code="invalid_json") from None

    async def local_start(self, request: web.Request) -> web.Response:
        """LocalEngineStartRequest {model, port, gpu_memory_utilization, quantization}; ?wait=1 waits until ready.
        Bad input is a 400 naming the field, and changes nothing."""
        body = await self._json_body(request)
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise GatewayError(400, "`model` is required: a Hugging Face id like Qwen/Qwen2.5-1.5B-Instruct",
                               param="model", code="invalid_value")
        port = body.get("port")
        if port is not None:
            self._check_port(port)
        util = body.get("gpu_memory_utilization")
        if util is not None and (isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1):
            raise GatewayError(400, f"`gpu_memory_utilization` {util!r} is not in (0, 1]",
                               param="gpu_memory_utilization", code="invalid_value")
        quant = body.get("quantization")
        if quant is not None and quant not in engines.quantization_methods():
            raise GatewayError(400, f"unknown `quantization` {quant!r} (e.g. awq, gptq, fp8, or null)",
                               param="quantization", code="invalid_value")
        unknown = set(body) - {"model", "port", "gpu_memory_utilization", "quantization"}
        if unknown:
            raise GatewayError(400, f"unknown field(s) {', '.join(sorted(unknown))} in LocalEngineStartRequest",
                               code="invalid_value")
        slot, fut = await self.router.start_model(model, port, util, quant)
        if request.query.get("wait") in ("1", "true", "yes"):
            try:
                await asyncio.shield(fut)
            except Refused as exc:
                return from_gateway_error(GatewayError.of(exc))
        return web.json_response({"model": slot.key, "state": slot.state.value, "engine": slot.engine.name
                                  if slot.engine else None, "events": "/api/events"},
                                 status=200 if slot.state == State.READY else 202)

    def _check_port(self, port: Any) -> None:
        """A port an engine can be started on: a number in 1024-65535, not the gateway's own, free now."""
        if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
            raise GatewayError(400, f"`port` {port!r} is not a port an engine can take (1024-65535, or leave it out"
                               " and the gateway picks one)", param="port", code="invalid_value")
        if port == self.opts.port or port in self.router.own_ports:
            raise GatewayError(400, f"`port` {port} is the gateway's own port; leave it out and the gateway picks "
                               "a free one", param="port", code="invalid_value")
        if not engines.port_free(port):
            raise GatewayError(400, f"`port` {port} is in use; pick a free port or leave it out and the gateway "
                               "picks one", param="port", code="port_in_use")

    async def local_stop(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        target = body.get("model") or body.get("name")
        if target is not None and not isinstance(target, str):
            raise GatewayError(400, "`model` must be a model id (or `name` an engine name)", code="invalid_value")
        running = [m for m in self.router.models() if m.group is None and any(
            (o.engine is not None and o.engine.managed) or o.state == State.LOADING
            for o in self.router.machine.group(m))]
        if target is None:
            if len(running) != 1:
                names = ", ".join(m.key for m in running) or "none"
                raise GatewayError(400, f"say which model to stop (running: {names})", param="model",
                                   code="invalid_value")
            slot = running[0]
        else:
            found = self.router.find(target) or self.router.engine_of(target)
            if found is None:
                raise GatewayError(404, f"no model or engine {target!r} (running: "
                                   f"{', '.join(m.key for m in running) or 'none'})", code="model_not_found")
            slot = found
        message = await self.router.stop_model(slot)
        return web.json_response({"model": slot.key, "stopped": True, "message": message})

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q = self.bus.subscribe()
        try:
            for card in self.router.catalog():  # where everything stands now, then what happens next
                await resp.write(sse_frame({"id": 0, "event": "state", "time": round(time.time(), 3),
                                            "model": card["id"], "state": card["state"], "engine": card["engine"],
                                            "stage": card["stage"], "progress": card["progress"]}))
            while True:
                try:
                    event = await asyncio.wait_for(q.get(), 15.0)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                await resp.write(sse_frame(event))
                if event["event"] == "gateway" and event.get("state") == "stopping":
                    break  # let the shutdown finish instead of waiting for this client to go away
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.bus.unsubscribe(q)
        return resp

    # ------------------------------------------------------------------------------------------------- proxy
    async def proxy(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        if request.method not in security.PROXY_METHODS:  # only POST loads; nothing else reaches an engine
            return error_response(405, f"method {request.method} not allowed on {request.path} (GET or POST)",
                                  code="method_not_allowed", headers={"Allow": ", ".join(security.PROXY_METHODS)})
        path = request.path  # an ENGINE_PATHS route, matched exactly
        if request.match_info.get("tail") is not None:
            try:
                path = security.proxy_path(request.raw_path)
            except security.PathRefused as exc:
                return error_response(400, str(exc), code="invalid_path")
        raw = b""
        body: dict[str, Any] | None = None
        try:
            if request.method == "POST":
                raw = await request.read()
                body = await bodies.read_object(raw)
        except bodies.BodyRefused as exc:
            return error_response(400, str(exc), code="invalid_json")
        try:
            model = bodies.model_name(body.get("model") if body is not None else request.query.get("model"))
        except bodies.BodyRefused as exc:
            return error_response(400, str(exc), param="model", code="invalid_value")
        if body is None and not model:
            return error_response(400, f"GET {request.path} needs ?model=NAME (the engine to ask)", param="model",
                                  code="invalid_value")
        label = self._metric_label(model)
        self.access.allow_model(model)  # 403 naming the key's model rule (before anything loads)
        try:
            backend = await self.router.route(model, load=request.method == "POST", body=body,
                                              headers=request.headers, shown=self.access.allows)
        except GatewayError as exc:
            self.metrics.request(label, "none", exc.status, time.monotonic() - t0)
            return from_gateway_error(exc)
        if backend.model is not None and body is not None:
            body["model"] = backend.model
            try:
                raw = await bodies.serialise(body, len(raw))
            except bodies.BodyRefused as exc:
                self.router.release(backend)  # the route's lease on the model
                return error_response(400, str(exc), code="invalid_json")
        url = _upstream_url(backend, path)
        if url is None:
            self.router.release(backend)
            return error_response(404, f"{path} is served by local engines only", code="not_found")
        key = caller.get()
        if key is None:
            return await self._relay(request, backend, path, raw, label, t0, body=body, url=url)
        relayed = False
        try:
            async with self.share.admit(key, backend, body, raw, label) as (meter, raw):  # fair turn, limits, usage
                relayed = True
                return await self._relay(request, backend, path, raw, label, t0, meter, body, url)
        finally:
            if not relayed:  # refused (429) or the client left while waiting for its turn: hand the lease back
                self.router.release(backend)

    def _metric_label(self, model: str | None) -> str:
        """The `model` label of a request's metrics: a name this gateway knows, else "other" (a client must not
        create a time series per name it sends)."""
        if model is None:
            return "auto"
        if model in VIRTUAL_MODELS or model in self.opts.upstreams:
            return model
        slot = self.router.find(model)
        return slot.key if slot is not None else "other"

    async def _relay(self, request: web.Request, backend: Backend, path: str, raw: bytes, label: str,
                     t0: float, meter: Meter | None = None, body: dict[str, Any] | None = None,
                     url: yarl.URL | None = None) -> web.StreamResponse:
        assert self.session is not None
        url_for: Backend | None = backend if url is not None else None  # the backend `url` was made for
        # the body is relayed as the upstream encoded it: ask for what the client accepts (identity when it says
        # nothing; aiohttp would ask for gzip), and pass Content-Encoding on
        headers = {"Accept": request.headers.get("Accept", "*/*"),
                   "Accept-Encoding": request.headers.get("Accept-Encoding", "identity")}
        if raw:
            headers["Content-Type"] = "application/json"
        if backend.api_key:
            headers["Authorization"] = f"Bearer {backend.api_key}"
        params: dict[str, str] | None = None  # None, not {}: aiohttp then leaves the URL as it is
        if request.query_string:
            params = {k: v for k, v in request.query.items() if k != "model"} if request.method == "GET" else \
                dict(request.query)
        code = 502  # the route holds a lease on the model: released in `finally`
        resp: web.StreamResponse | None = None
        try:
            while True:
                if url is None or url_for is not backend:
                    url, url_for = _upstream_url(backend, path), backend
                assert url is not None  # checked before the relay; a retry goes to the same kind of backend
                try:
                    on_node = backend.handle is not None and getattr(backend.handle, "node", None)
                    up_cm = self.session.request(request.method, url, data=raw or None, headers=headers,
                                                 params=params or None, **({"timeout": NODE_CONNECT} if on_node
                                                                           else {}))
                    up = await up_cm.__aenter__()
                    break
                except (aiohttp.ClientError, OSError) as exc:
                    if backend.source == "local":
                        self.router.engine_failed(backend)
                    # nothing reached the client yet: once more on another replica of the model, if it has one
                    again = await self.router.retry(backend, body, request.headers) if backend.source == "local" \
                        and not backend.retried else None
                    if again is None:
                        return error_response(502, f"{backend.source} upstream {backend.engine} is not answering: "
                                              f"{type(exc).__name__}", "server_error", "upstream_unavailable")
                    self.router.release(backend)
                    backend, again.retried = again, True
                    headers.pop("Authorization", None)
                    if backend.api_key:
                        headers["Authorization"] = f"Bearer {backend.api_key}"
            try:
                code = up.status
                resp = web.StreamResponse(status=up.status)
                ctype = up.headers.get("Content-Type", "application/json")
                resp.headers["Content-Type"] = ctype
                resp.headers["x-sage-llm-source"] = backend.source
                resp.headers["x-sage-llm-engine"] = backend.engine
                for name in RELAYED_HEADERS:
                    if name in up.headers:
                        resp.headers[name] = up.headers[name]
                resp.headers.update(RELAY_SAFETY)
                streaming = ctype.lower().startswith("text/event-stream")
                if streaming:
                    resp.headers["Cache-Control"] = "no-cache"
                    resp.headers["X-Accel-Buffering"] = "no"
                elif up.content_length is not None:
                    resp.content_length = up.content_length
                # bytes that came with the upstream's head (vLLM's first SSE event, or a whole small answer) go out
                # in one write with our head: one send and one wake-up of the client less. Without them the head
                # goes out at once, as before (a client sees 200 while the engine is still in prefill)
                try:
                    first = up.content.read_nowait()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    first = b""  # the upstream broke already: the loop's read meets the same error
                if first:
                    resp._send_headers_immediately = False  # aiohttp >= 3.11; ignored by older ones
                await resp.prepare(request)
                broke: BaseException | None = None
                while True:
                    try:
                        if first:
                            chunk, first = first, b""
                        else:
                            chunk = await up.content.readany()
                    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                        broke = exc
                        break
                    if not chunk:
                        if not up.content.is_eof():
                            continue
                        break
                    if meter is not None:
                        chunk = meter.feed(chunk, streaming)  # usage read (and our own usage chunk dropped)
                    if chunk:
                        await resp.write(chunk)  # raises when our client is gone: the upstream is closed below
                if broke is not None:
                    code = 502
                    if backend.source == "local":
                        self.router.engine_failed(backend)
                    if streaming:
                        err = {"error": {"message": f"upstream {backend.engine} broke off the stream: "
                                         f"{type(broke).__name__ if broke else 'connection closed'}",
                                         "type": "server_error", "code": "upstream_disconnected"}}
                        with contextlib.suppress(ConnectionResetError):
                            await resp.write(f"data: {json.dumps(err)}\n\n".encode())
                with contextlib.suppress(ConnectionResetError):
                    await resp.write_eof()
                return resp
            finally:
                await up_cm.__aexit__(None, None, None)
        except ConnectionResetError:
            code = 499  # the client went away; leaving the `async with` closed the upstream request
            return resp if resp is not None else web.Response(status=499)
        except asyncio.CancelledError:
            code = 499  # the client went away (handler cancelled): not an answer it got
            raise
        finally:
            self.router.release(backend)
            self.metrics.request(label, backend.source, code, time.monotonic() - t0)
            if meter is not None:
                meter.finish(code)


def _upstream_url(backend: Backend, path: str) -> yarl.URL | None:
    if path.startswith("/v1/"):
        return _url(backend.v1_base + path[3:], True)  # exactly the bytes proxy_path checked
    if backend.root is not None:
        return _url(backend.root + path, False)
    return None


@functools.lru_cache(maxsize=512)  # engines x routes: a handful; a URL is immutable, so one is shared
def _url(text: str, encoded: bool) -> yarl.URL:
    return yarl.URL(text, encoded=encoded)


def _upstream_socket(addr_info: Any) -> socket.socket:
    """A socket to an upstream that notices a peer gone silent (a node whose link or power went, which drops packets
    instead of refusing them): keep-alive probes after 5 s of silence, 2 s apart, 3 unanswered end it; sent data not
    acknowledged for 12 s ends it too. A request pending on it then fails (retried on another replica before its
    first byte; a started stream ends with the error event) instead of waiting forever on a reused connection.
    The peer's kernel answers the probes, so an engine busy in a long prefill is never cut."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=type_, proto=proto)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 12000)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock


def _socket_factory() -> dict[str, Any]:
    """`socket_factory` for aiohttp's connector where it takes one (aiohttp >= 3.12); older ones keep the defaults."""
    import inspect

    return {"socket_factory": _upstream_socket} if "socket_factory" in inspect.signature(
        aiohttp.TCPConnector.__init__).parameters else {}


# an engine on another node of a cluster: a connection that is not accepted within 3 s means the node is gone
# (a link down drops packets instead of refusing them); the request is then retried on another replica
NODE_CONNECT = aiohttp.ClientTimeout(total=None, sock_connect=3)


async def _serve(opts: GatewayOptions, ready: Any = None) -> Gateway:
    lock = instance.hold(opts.port)  # one gateway per state directory, for its whole life
    try:
        return await _serve_locked(opts, ready)
    finally:
        lock.release()


async def _serve_locked(opts: GatewayOptions, ready: Any = None) -> Gateway:
    from concurrent.futures import ThreadPoolExecutor

    # the effects' blocking calls (a start blocks a thread for the whole load; a Ray call up to its timeout) run in
    # threads: asyncio's default pool has cpu_count + 4 of them, which a few loads on a small machine would use up,
    # leaving the refresh, liveness checks and stops queued behind them
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix="gw"))
    await asyncio.to_thread(engines.use_cluster_link, opts.cluster)  # Ray lives in a worker process of its own
    try:
        return await _serve_linked(opts, ready)
    finally:
        await asyncio.to_thread(engines.drop_cluster_link)


async def _serve_linked(opts: GatewayOptions, ready: Any = None) -> Gateway:
    gw = Gateway(opts)
    runner = web.AppRunner(gw.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port, reuse_address=True, backlog=1024,
                       ssl_context=opts.tls_context())  # HTTPS with --tls-cert/--tls-key (options.py)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SageLLMError(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror}",
                           hint="is another gateway running (`sage-llm gateway status`)? or pass --port") from None
    warning = opts.cleartext_warning()
    if warning:
        sys.stderr.write(f"Warning: {warning}\n")  # once, at start (the console, or the daemon's log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    gw.loop, gw.stop_event = loop, stop  # type: ignore[attr-defined]
    if ready is not None:
        ready(gw)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        gw.bus.publish("gateway", state="stopping")
    finally:
        await runner.cleanup()
    return gw


def serve(opts: GatewayOptions, ready: Any = None) -> Gateway:
    """Run the gateway in the foreground until SIGINT/SIGTERM; returns it (with `stopped_engines`)."""
    return asyncio.run(_serve(opts, ready))
