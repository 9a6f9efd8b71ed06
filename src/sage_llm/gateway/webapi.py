"""The gateway's web panel (GET / and /static/...) and the management routes it uses beyond the seed's API:
monitoring (`sage-llm top`'s data), engine log tails (`sage-llm logs -f`), and model management (`sage-llm models`).

Every route here reuses the library function the CLI uses (monitor.Monitor, logs.tail/follow/resolve,
models.local_models/recommend/pull/plan_remove/remove); nothing is recomputed. The page is a plain client of these
routes: whatever it does, Studio can do with the same calls.

Static assets ship in the package (sage_llm/gateway/web/); they are served with a strict Content-Security-Policy
(scripts and styles from this origin only, `connect-src 'self'`, no inline script, no framing), and pass the same
Host/Origin checks as every other route (the gateway's middleware).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from importlib import resources
from typing import Any

from aiohttp import web

from sage_llm.core.errors import SageLLMError, UsageError
from sage_llm.gateway.events import sse_frame
from sage_llm.gateway.router import GatewayError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
MONITOR_MIN_S = 0.9  # several pages polling share one tick per second
PULL_EVENT_S = 0.25  # at most this often a `pull` progress event per download


def is_page_asset(method: str, path: str) -> bool:
    """GET / and GET /static/NAME: the panel's own files (no data), served without the API key (Host check still
    applies). Everything the page then asks for carries the key the user typed in (`Authorization: Bearer`)."""
    return method in ("GET", "HEAD") and (path == "/" or (path.startswith("/static/") and
                                                           path[len("/static/"):] in ASSETS))


def _asset(name: str) -> bytes:
    return resources.files("sage_llm.gateway").joinpath("web", name).read_bytes()


def _static_headers(ctype: str) -> dict[str, str]:
    return {"Content-Type": f"{ctype}; charset=utf-8", "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
            "Cache-Control": "no-cache"}


def _round(v: float | None, n: int = 3) -> float | None:
    return None if v is None else round(v, n)


def frame_json(frame: Any) -> dict[str, Any]:
    """A monitor.Frame as JSON; histories as [seconds before the frame, value] pairs."""
    def hist(points: list[tuple[float, float]]) -> list[list[float]]:
        return [[round(t - frame.now, 2), round(v, 3)] for t, v in points]

    return {
        "at": round(frame.at, 3), "interval_s": frame.interval, "history_s": frame.history_s,
        "gpus": [{**g.info.to_json(), "memory_history": hist(g.memory_history)} for g in frame.gpus],
        "gpu_error": frame.gpu_error,
        "engines": [{"key": e.key, "name": e.name, "state": e.state, "managed": e.managed, "stage": e.stage,
                     "progress": e.progress, "model": e.model, "port": e.port, "pid": e.pid,
                     "vram_bytes": e.vram_bytes, "gpus": e.gpus, "running": e.running, "waiting": e.waiting,
                     "kv_cache_usage": _round(e.kv_cache_usage, 4), "prompt_tps": _round(e.prompt_tps, 2),
                     "generation_tps": _round(e.generation_tps, 2), "ttft_p50_s": _round(e.ttft_p50_s, 4),
                     "metrics_error": e.metrics_error, "generation_history": hist(e.generation_history)}
                    for e in frame.engines],
        "warnings": frame.warnings,
    }


def model_json(m: Any) -> dict[str, Any]:
    return {"repo_id": m.repo_id, "size_on_disk": m.size_on_disk, "nb_files": m.nb_files, "source": m.source,
            "complete": m.complete and not m.incomplete, "incomplete_bytes": m.incomplete_bytes,
            "architecture": m.architecture, "context_length": m.context_length, "quantization": m.quantization,
            "torch_dtype": m.torch_dtype, "error": m.error, "served_by": m.served_by,
            "last_modified": m.last_modified}


class WebAPI:
    def __init__(self, gateway: Any) -> None:
        self.gw = gateway
        self._monitor: Any = None
        self._monitor_lock = asyncio.Lock()
        self._frame: dict[str, Any] | None = None
        self._frame_at = 0.0
        self.pulls: dict[str, dict[str, Any]] = {}

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/static/{name}", self.static)
        r.add_get("/api/engines", self.engines)
        r.add_get("/api/stages", self.stages)
        r.add_get("/api/monitor", self.monitor)
        r.add_get("/api/engines/{name}/logs", self.logs)
        r.add_get("/api/models", self.models)
        r.add_post("/api/models/pull", self.pull)
        r.add_post("/api/models/remove", self.remove)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, app: web.Application) -> None:
        if self._monitor is not None:
            self._monitor.close()

    # ------------------------------------------------------------------------------------------------- static
    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=_asset("index.html"), headers=_static_headers("text/html"))

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise GatewayError(404, f"no asset {name!r}", code="not_found")
        return web.Response(body=_asset(name), headers=_static_headers(ASSETS[name]))

    async def engines(self, request: web.Request) -> web.Response:
        """The engines this gateway routes to (its own view: `--no-external` hides external ones), one object per
        engine with the seed's running info, plus the models loading now."""
        from sage_llm.core.state import parse_iso
        from sage_llm.gateway.engines import human_uptime

        router = self.gw.router
        seen: dict[str, Any] = {e.name: e for e in router.engines if not e.static}
        models = router.models()
        for slot in models:
            if slot.engine is not None and not slot.engine.static:
                seen[slot.engine.name] = slot.engine
        by_engine = {s.engine.name: s for s in models if s.engine is not None}
        now = time.time()
        out = []
        for e in seen.values():
            slot = by_engine.get(e.name)
            started = parse_iso(e.started_at)
            uptime = round(now - started, 1) if started else None
            # the engine's own state, except what only the gateway knows (it put the engine to sleep, is stopping it)
            state = slot.state.value if slot is not None and slot.state in ("sleeping", "stopping") else e.state
            out.append({"name": e.name, "model": e.model, "served_model_name": e.served, "port": e.port, "pid": e.pid,
                        "state": state, "managed": e.managed, "managed_by_gateway": e.owned, "external": not e.managed,
                        "gpu_memory_bytes": e.gpu_memory_bytes,
                        "gpu_memory_usage": round(e.gpu_memory_bytes / 1024**3, 2) if e.gpu_memory_bytes else None,
                        "uptime_s": uptime, "uptime": human_uptime(uptime), "started_at": e.started_at,
                        "stage": e.stage, "progress": e.progress, "error": e.error,
                        "max_model_len": e.max_model_len,
                        "gpu_memory_utilization": (e.settings or {}).get("gpu_memory_utilization"),
                        "quantization": (e.settings or {}).get("quantization"),
                        "node": e.node, "replica": slot.index if slot is not None and slot.profile is not None
                        and slot.profile.replicated else None})
        loading = [{"model": s.group or s.key, "replica": s.index, "stage": s.stage, "progress": s.progress}
                   for s in models if s.state == "loading"]
        return web.json_response({"engines": sorted(out, key=lambda x: x["name"]), "loading": loading,
                                  "local_engine": await self._local()})

    async def _local(self) -> dict[str, Any]:
        from sage_llm.gateway import engines

        return engines.local_engine_status(self.gw.router.views)

    async def stages(self, request: web.Request) -> web.Response:
        """The load stages in order with the labels `start` prints (progress.LABELS)."""
        from sage_llm.observe.progress import LABELS

        return web.json_response({"stages": [{"name": k, "label": v} for k, v in LABELS.items()]})

    # ------------------------------------------------------------------------------------------------- monitor
    async def monitor(self, request: web.Request) -> web.Response:
        """What `sage-llm top` shows: one monitor.Frame (GPUs, engines, rates, last minutes of history)."""
        async with self._monitor_lock:
            if self._frame is None or time.monotonic() - self._frame_at >= MONITOR_MIN_S:
                if self._monitor is None:
                    from sage_llm.engine.monitor import Monitor

                    self._monitor = Monitor(interval=1.0, history_s=300.0,
                                            include_external=self.gw.opts.external)
                frame = await asyncio.to_thread(self._monitor.tick)
                self._frame, self._frame_at = frame_json(frame), time.monotonic()
            return web.json_response(self._frame)

    # ------------------------------------------------------------------------------------------------- logs
    async def logs(self, request: web.Request) -> web.StreamResponse:
        """The engine's log tail (`?n=`, default 200); `?follow=1`: Server-Sent Events, `line` per log line, `notice`
        (rotation, truncation) and `end` (the engine stopped or exited), like `sage-llm logs -f`."""
        from sage_llm.engine import logtarget
        from sage_llm.observe import logs

        name = request.match_info["name"]
        try:
            n = int(request.query.get("n", "200"))
        except ValueError:
            raise GatewayError(400, f"`n` {request.query.get('n')!r} is not a number of lines", param="n",
                               code="invalid_value") from None
        n = max(0, min(n, 5000))
        try:
            target = await asyncio.to_thread(logtarget.resolve, name)
        except SageLLMError as exc:
            raise GatewayError(404, exc.message, code="not_found") from None
        if request.query.get("follow") not in ("1", "true", "yes"):
            lines = await asyncio.to_thread(logs.tail, target.path, n) if target.path.exists() else []
            return web.json_response({"name": target.name, "path": str(target.path), "lines": lines})
        # the tail ends after the last complete line and the follow goes on from there: nothing lost or shown twice
        offset = await asyncio.to_thread(logs.complete_end, target.path)
        lines = await asyncio.to_thread(logs.tail, target.path, n, offset) if target.path.exists() else []
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[str, str]] = asyncio.Queue(10000)
        quit_ = threading.Event()
        ended = logtarget.engine_ended(target)

        def stop() -> str | None:
            return "client gone" if quit_.is_set() else ended()

        def put(kind: str, text: str) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait((kind, text))

        def reader() -> None:
            try:
                for ev in logs.follow(target.path, stop=stop, poll=0.2, check_every=0.5, start_offset=offset):
                    if quit_.is_set():
                        return
                    loop.call_soon_threadsafe(put, ev.kind, ev.text)
            except Exception as exc:  # the file vanished under us, etc.: said on the stream
                loop.call_soon_threadsafe(put, "end", f"{type(exc).__name__}: {exc}")

        seq = 0

        async def send(kind: str, text: str) -> None:
            nonlocal seq
            seq += 1
            await resp.write(sse_frame({"id": seq, "event": kind, "text": text}))

        async def gateway_stopping() -> None:  # a shutdown ends the stream instead of waiting for the client
            stop_event = getattr(self.gw, "stop_event", None)
            if stop_event is not None:
                await stop_event.wait()
                put("end", "the gateway is stopping")

        thread = threading.Thread(target=reader, daemon=True, name=f"sage-logs-{target.name}")
        watcher = asyncio.ensure_future(gateway_stopping())
        try:
            for line in lines:
                await send("line", line)
            thread.start()
            while True:
                try:
                    kind, text = await asyncio.wait_for(q.get(), 15.0)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                await send(kind, text)
                if kind == "end":
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            quit_.set()
            watcher.cancel()
        return resp

    # ------------------------------------------------------------------------------------------------- models
    async def models(self, request: web.Request) -> web.Response:
        """`sage-llm models` (cached models with their size and the engines serving them) and `models recommend`
        (the curated list with the GPU fit), plus the downloads in progress."""
        from sage_llm.engine import catalog as models

        def collect() -> dict[str, Any]:
            found, warnings = models.local_models()
            rows, gpu_error = models.recommend()
            return {"models": [model_json(m) for m in found], "warnings": warnings, "recommended": rows,
                    "gpu_error": gpu_error}

        doc = await asyncio.to_thread(collect)
        serving: dict[str, list[str]] = {}
        for e in self.gw.router.engines:  # engines the gateway routes to, external ones included
            for n in {e.model, e.served} - {None}:
                serving.setdefault(str(n), []).append(e.name)
        for m in doc["models"]:
            names = [u["name"] for u in m["served_by"]]
            m["engines"] = sorted(set(names) | set(serving.get(m["repo_id"], [])))
        doc["pulls"] = list(self.pulls.values())
        return web.json_response(doc)

    async def pull(self, request: web.Request) -> web.Response:
        """{"model": ORG/NAME, "revision"?}: 202, then `pull` events on /api/events (bytes, total, state)."""
        from sage_llm.engine import catalog as models

        body = await self.gw._json_body(request)
        model = body.get("model")
        revision = body.get("revision")
        unknown = set(body) - {"model", "revision"}
        if unknown:
            raise GatewayError(400, f"unknown field(s) {', '.join(sorted(unknown))}", code="invalid_value")
        if not isinstance(model, str):
            raise GatewayError(400, "`model` is required: a Hugging Face id like Qwen/Qwen2.5-1.5B-Instruct",
                               param="model", code="invalid_value")
        if revision is not None and not isinstance(revision, str):
            raise GatewayError(400, "`revision` must be a string", param="revision", code="invalid_value")
        try:
            models.check_repo_id(model)
        except UsageError as exc:
            raise GatewayError(400, exc.message, param="model", code="invalid_value") from None
        cur = self.pulls.get(model)
        if cur is not None and cur["state"] == "downloading":
            return web.json_response(cur, status=202)
        bus = self.gw.bus
        # the worker thread only changes values, never keys: /api/models may serialise it meanwhile
        state: dict[str, Any] = {"model": model, "state": "downloading", "bytes": 0, "total": None,
                                 "error": None, "started": round(time.time(), 3), "seconds": None}
        self.pulls[model] = state
        last = [0.0]

        def on_bytes(done: int, total: int | None) -> None:
            state["bytes"], state["total"] = done, total
            now = time.monotonic()
            if now - last[0] >= PULL_EVENT_S:
                last[0] = now
                bus.publish_threadsafe("pull", **dict(state))

        def run() -> None:
            try:
                result = models.pull(model, revision=revision, on_bytes=on_bytes)
                state.update(state="done", bytes=result.size_on_disk, total=result.size_on_disk,
                             seconds=round(result.seconds, 2))
            except SageLLMError as exc:
                state.update(state="failed", error=exc.message + (f" (hint: {exc.hint})" if exc.hint else ""))
            except Exception as exc:
                state.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            bus.publish_threadsafe("pull", **dict(state))

        bus.publish("pull", **dict(state))
        self.gw._bg(self._pull_then_refresh(run))
        return web.json_response({**state, "events": "/api/events"}, status=202)

    async def _pull_then_refresh(self, run: Any) -> None:
        await asyncio.to_thread(run)
        with contextlib.suppress(Exception):
            await self.gw.router.refresh()  # the new model appears in /v1/models

    async def remove(self, request: web.Request) -> web.Response:
        """{"model": ORG/NAME}: deletes every cached copy; 409 while an engine serves it (nothing removed)."""
        from sage_llm.engine import catalog as models

        body = await self.gw._json_body(request)
        model = body.get("model")
        if not isinstance(model, str) or set(body) - {"model"}:
            raise GatewayError(400, "send {\"model\": \"ORG/NAME\"}", param="model", code="invalid_value")
        for e in self.gw.router.engines:
            if model in (e.model, e.served):
                raise GatewayError(409, f"{model} is served by engine {e.name} (port {e.port}); nothing was "
                                   f"removed: stop it first", code="model_in_use")
        if (self.pulls.get(model) or {}).get("state") == "downloading":
            raise GatewayError(409, f"{model} is being downloaded; nothing was removed", code="model_in_use")
        try:
            plan = await asyncio.to_thread(models.plan_remove, model)
        except models.ModelInUse as exc:
            raise GatewayError(409, exc.message + (f" ({exc.hint})" if exc.hint else ""),
                               code="model_in_use") from None
        except models.ModelNotFound as exc:
            raise GatewayError(404, exc.message, code="model_not_found") from None
        except UsageError as exc:
            raise GatewayError(400, exc.message, param="model", code="invalid_value") from None
        freed = await asyncio.to_thread(models.remove, plan)
        self.pulls.pop(model, None)
        with contextlib.suppress(Exception):
            await self.gw.router.refresh()
        self.gw.bus.publish("removed", model=model, freed_bytes=freed)
        return web.json_response({"model": model, "removed": True, "freed_bytes": freed})

