"""Model names -> engines: the catalogue, routing (aliases, virtual models, cloud fallback, --upstream routes), the
refresh and TTL loops. Every lifecycle decision is the per-model state machine's (machine.py); this module only
submits to it and awaits. Engines are reached through gateway/engines.py (EngineEffects), the one door to engine/.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sage_llm.core.errors import SageLLMError
from sage_llm.gateway import balance, engines
from sage_llm.gateway.events import EventBus
from sage_llm.gateway.machine import Config, Model, Refused, Scheduler, State
from sage_llm.gateway.metrics import Metrics
from sage_llm.gateway.options import VIRTUAL_MODELS, GatewayOptions, Profile

CACHE_RESCAN_S = 30.0  # the HF cache is rescanned when its directory changes, else at most this often


class GatewayError(Exception):
    """An answer in OpenAI's error format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.retry_after = retry_after
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, r: Refused) -> GatewayError:
        return cls(r.status, r.message, r.type, r.code, r.retry_after, r.param)


@dataclass
class Backend:
    """Where one request goes. A local backend holds a lease on its model (`Router.release` ends it)."""

    source: str  # local | cloud
    v1_base: str  # ... up to and including /v1
    root: str | None  # engine root URL for non-/v1 paths (local only)
    api_key: str | None
    engine: str  # engine name, or "cloud", or the --upstream model
    model: str | None  # rewrite the body's `model` to this (virtual names), else None
    slot: Model | None = None
    handle: Any = None  # the engines.Engine routed to (local)
    retried: bool = False  # this is the one retry of a request whose first replica failed before any byte


def card(m: Model, members: list[Model] | None = None) -> dict[str, Any]:
    e = m.engine
    out = {"id": m.key, "object": "model", "created": 0, "owned_by": "sage-llm",
           "state": m.state.value, "loadable": m.loadable, "engine": e.name if e else None,
           "managed_by_gateway": m.owned, "pinned": m.pinned,
           "aliases": list(m.profile.aliases) if m.profile else [], "error": m.error,
           "stage": m.stage, "progress": m.progress}
    if m.profile is not None and m.profile.replicated:
        out["replicas"] = [{"replica": o.index, "state": o.state.value, "engine": o.engine.name if o.engine else None,
                            "in_flight": o.inflight, "error": o.error} for o in members or [m]]
        out["min_replicas"], out["max_replicas"] = m.profile.min_replicas, m.profile.max_replicas
        if m.state != State.READY and any(o.state == State.READY for o in members or []):
            out["state"] = State.READY.value  # served by another replica while its first one is down
    return out


class Router:
    def __init__(self, opts: GatewayOptions, bus: EventBus, metrics: Metrics, own_ports: set[int],
                 effects: Any = None) -> None:
        self.opts = opts
        self.bus = bus
        self.metrics = metrics
        self.own_ports = own_ports
        self.effects = effects or engines.EngineEffects(opts)
        self.machine = Scheduler(self.effects, Config(max_engines=opts.max_engines, max_queue=opts.max_queue,
                                                      ttl=opts.ttl, sleep=opts.sleep,
                                                      scale_out_waiting=opts.scale_out_waiting,
                                                      scale_out_s=opts.scale_out_s), bus.publish, metrics)
        self.names: dict[str, str] = {}
        self.engines: list[engines.Engine] = []  # every engine seen at the last refresh
        self.views: list[Any] = []
        self._refresh_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_settings: dict[str, dict[str, Any]] = {}
        self._cached: list[Any] = []
        self._cache_stamp: Any = None
        self._cache_read_at = 0.0
        for model, profile in opts.profiles.items():
            self._model(model).profile = profile

    @property
    def session(self) -> Any:
        return self.effects.session

    @session.setter
    def session(self, value: Any) -> None:
        self.effects.session = value

    @property
    def cpu(self) -> bool | None:
        return self.effects.cpu  # type: ignore[no-any-return]

    @cpu.setter
    def cpu(self, value: bool | None) -> None:
        self.effects.cpu = value

    @property
    def queued(self) -> int:
        return self.machine.queued

    # -------------------------------------------------------------------------------------------- catalogue
    def _model(self, key: str) -> Model:
        self.names.setdefault(key, key)
        return self.machine.model(key)

    def _alias(self, name: str | None, key: str) -> None:
        slot = self.machine.models.get(key)
        if slot is not None and slot.group is not None:
            key = slot.group  # a replica answers to its model's names
        if name and name not in VIRTUAL_MODELS:
            self.names[name] = key

    def models(self) -> list[Model]:
        """Every engine slot: the models and their replicas (`KEY#2`, ...)."""
        return list(self.machine.models.values())

    def find(self, name: str) -> Model | None:
        """The model (never a replica slot) called `name`: its key, a name it answers to, or a profile's alias."""
        models = self.machine.models  # two lookups, no copy: this runs twice per request
        m = models.get(name)
        if m is None or m.group is not None:
            key = self.names.get(name)
            m = models.get(key) if key is not None else None
            if m is None or m.group is not None:
                m = next((o for o in models.values() if o.group is None and o.profile and name in o.profile.aliases),
                         None)
        return m

    def catalog(self) -> list[dict[str, Any]]:
        cards = [card(m, self.machine.group(m)) for m in self.machine.models.values() if m.group is None]
        for model in self.opts.upstreams:
            cards.append({"id": model, "object": "model", "created": 0, "owned_by": "upstream", "state": "ready",
                          "loadable": False, "engine": model, "managed_by_gateway": False, "pinned": False,
                          "aliases": [], "error": None, "stage": None, "progress": None})
        return sorted(cards, key=lambda c: ({"ready": 0, "loading": 1, "sleeping": 2}.get(c["state"], 3), c["id"]))

    def known_names(self, shown: Callable[[str], bool] | None = None) -> list[str]:
        """Model names for an error's list ("Models: ..."): replica slots left out, and with `shown` only those it
        allows (the caller's key's)."""
        names = {k for k in self.machine.models if "#" not in k} | set(self.opts.upstreams)
        return sorted(n for n in names if shown is None or shown(n))

    def engine_of(self, name: str) -> Model | None:
        """The model whose engine is called `name`."""
        return next((m for m in self.machine.models.values() if m.engine is not None and m.engine.name == name), None)

    async def refresh(self) -> None:
        """Re-read engines (records + external vLLMs), the HF cache and the profiles; the machine reconciles what
        has not changed since the reading began (an observation never overrides a newer decision)."""
        async with self._refresh_lock:
            epochs = self.machine.epochs()
            found, views = await asyncio.to_thread(self.effects.inspect, self.own_ports, True, self.opts.external)
            stamp = await asyncio.to_thread(engines.cache_stamp)
            now = time.monotonic()
            if stamp != self._cache_stamp or now - self._cache_read_at > CACHE_RESCAN_S:
                self._cached = await asyncio.to_thread(engines.cached_models)
                self._cache_stamp, self._cache_read_at = stamp, now
            if self.effects.cpu is None:
                self.effects.cpu = await asyncio.to_thread(engines.is_cpu_engine)
        self.engines, self.views = found, views

        def profile_for(key: str) -> Profile:
            return Profile(model=key, settings=self._last_settings.get(key, {}))

        def key_of(e: engines.Engine) -> str:
            key = e.model if e.managed and e.model else (e.served or e.model or e.name)
            held = self.engine_of(e.name)
            if held is not None:
                return held.key  # the slot that holds it already (a replica keeps its slot)
            root = self.machine.models.get(key)
            p = root.profile if root is not None else None
            if root is not None and p is not None and p.replicated and e.managed:
                for index in range(2, p.slots + 1):  # a replica of a gateway that ran before: adopted
                    if e.name == replace(p, replica=index).engine_name():
                        return self.machine.slot(root, index).key
            self.names.setdefault(key, key)
            return key

        self.machine.observe(found, [m.repo_id for m in self._cached], epochs, self._last_settings, profile_for,
                             self._alias, key_of)
        for n in [n for n, k in self.names.items() if k not in self.machine.models]:
            del self.names[n]

    # -------------------------------------------------------------------------------------------- routing
    def _cloud(self, model: str | None, virtual: bool) -> Backend:
        from sage_llm.chat import session as chat

        try:
            target = chat.resolve_cloud(None)
        except SageLLMError as exc:
            raise GatewayError(503, f"no cloud API to fall back to: {exc.message}", "service_unavailable",
                               "cloud_not_configured") from None
        rewrite = None
        if virtual:
            if not target.model:
                raise GatewayError(400, "model 'cloud' needs SAGE_CHAT_MODEL: the cloud model to ask",
                                   code="cloud_model_unset", param="model")
            rewrite = target.model
        return Backend("cloud", target.base_url, None, target.api_key, "cloud", rewrite)

    def _local_default(self) -> Model | None:
        """The model `local`/`auto` mean: the ready engine Studio's LocalEngineStatus names, else the default
        model (SAGE_LOCAL_ENGINE_DEFAULT_MODEL) when it can be loaded."""
        from sage_llm.core import settings

        local = engines.local_engine_status(self.views) if self.views else {"running": False}
        if local.get("running"):
            m = self.find(local["model"])
            if m is not None and m.state == State.READY:
                return m
        for m in self.machine.models.values():
            if m.state == State.READY and m.engine is not None:
                return m
        m = self.find(settings.get("default_model"))
        return m if m is not None and m.loadable else None

    async def route(self, model: str | None, load: bool = True, body: dict[str, Any] | None = None,
                    headers: Any = None, shown: Callable[[str], bool] | None = None) -> Backend:
        """Where a request naming `model` goes; loads the model first if needed (may wait). With `load=False` (GET
        requests: no state change on a GET) only a model already being served is routed to. A local backend is
        leased: call `release` when the request ends."""
        name = model or "auto"
        if name in self.opts.upstreams:
            return Backend("local", self.opts.upstreams[name], None, None, name, None)
        if not load:
            m = self.find(name)
            ready = self.machine.ready_members(m) if m is not None else []
            if m is not None and ready:
                m = min(ready, key=lambda o: o.inflight)  # a model with replicas: its least busy ready one
            if m is None or m.state != State.READY or m.engine is None:
                raise GatewayError(409, f"model {name!r} is not loaded; a GET never loads a model (send a POST "
                                   "request naming it, or POST /api/local-engine/start)", code="model_not_loaded",
                                   param="model")
            return self._local(m, await self._acquire(m), rewrite=None)
        if name in VIRTUAL_MODELS:
            if name == "cloud":
                return self._cloud(None, True)
            m = self._local_default()
            if m is None:
                if name == "auto" and self.opts.fallback:
                    return self._cloud(None, True)
                raise GatewayError(503, "no local model is ready or loadable (set SAGE_LOCAL_ENGINE_DEFAULT_MODEL "
                                   "to a cached model, or name one)", "service_unavailable", "no_local_model")
            try:
                engine = await self._acquire(m)
            except GatewayError:
                if name == "auto" and self.opts.fallback:
                    return self._cloud(None, True)
                raise
            return self._local(m, engine, rewrite=engine.served or m.key)
        m = self.find(name)
        if m is None or (m.engine is None and not m.loadable):
            if self.opts.fallback:
                with contextlib.suppress(GatewayError):
                    return self._cloud(name, False)
            names = ", ".join(self.known_names(shown)) or "none"  # `shown`: those the caller's key may use
            raise GatewayError(404, f"The model `{name}` does not exist here. Models: {names}",
                               code="model_not_found", param="model")
        slot, reason = self._pick(m, body, headers)
        engine = await self._acquire(slot)
        served = engine.served or m.key
        return self._chosen(m, slot, engine, reason, rewrite=served if served != name else None)

    def _pick(self, m: Model, body: dict[str, Any] | None, headers: Any, exclude: frozenset[str] = frozenset(),
              ) -> tuple[Model, str | None]:
        """The replica of `m` that answers (balance.choose among the ready ones), or `m` itself (which loads it)
        when none is ready or the model has one engine; with the reason of the choice."""
        if m.profile is None or not m.profile.replicated:
            return m, None
        self.machine.scale(m)
        ready = [o for o in self.machine.ready_members(m) if o.engine.name not in exclude]
        seqs = m.profile.seqs()
        choice = balance.choose([balance.Replica(o.engine.name, getattr(o.engine, "node", None), o.inflight, seqs)
                                 for o in ready], body, headers)
        if choice is None:
            return m, "load"
        return next(o for o in ready if o.engine.name == choice.replica.engine), choice.reason

    def _chosen(self, m: Model, slot: Model, engine: engines.Engine, reason: str | None, rewrite: str | None
                ) -> Backend:
        if slot.engine is not engine:  # the machine leased another ready replica: `slot` left meanwhile
            slot = self.engine_of(engine.name) or slot
        backend = self._local(slot, engine, rewrite)
        if reason is not None:
            self.metrics.choice(m.key, engine.name, reason)
        return backend

    async def retry(self, failed: Backend, body: dict[str, Any] | None, headers: Any) -> Backend | None:
        """A request to `failed` broke before any byte reached the client: once more, on another ready replica of
        the same model (balance.retry_target's rule), or None. The caller releases `failed`."""
        slot = failed.slot
        root = self.machine.models.get(slot.group) if slot is not None and slot.group else slot
        if root is None or root.profile is None or not root.profile.replicated:
            return None
        target, _ = self._pick(root, body, headers, exclude=frozenset({failed.engine}))
        if target.state != State.READY or target.engine is None or target.engine.name == failed.engine:
            return None
        try:
            engine = await self._acquire(target)
        except GatewayError:
            return None
        if engine.name == failed.engine:
            self.machine.release(target)
            return None
        return self._chosen(root, target, engine, "retry", failed.model)

    async def _acquire(self, m: Model) -> engines.Engine:
        fut = self.machine.acquire(m)
        if fut.done() and not fut.cancelled():  # the usual case, a ready engine: leased at once, nothing to wait for
            exc = fut.exception()
            if isinstance(exc, Refused):
                raise GatewayError.of(exc) from None
            if exc is not None:
                raise exc
            return fut.result()  # type: ignore[no-any-return]
        try:
            return await asyncio.shield(fut)  # type: ignore[no-any-return]
        except Refused as exc:
            raise GatewayError.of(exc) from None
        except asyncio.CancelledError:
            # the client went away while waiting: a lease granted meanwhile is handed back
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self.machine.release(m))
            raise

    def _local(self, m: Model, engine: engines.Engine, rewrite: str | None) -> Backend:
        return Backend("local", engine.base_url + "/v1", engine.base_url, engine.api_key, engine.name, rewrite, m,
                       engine)

    def release(self, backend: Backend) -> None:
        """The request routed to `backend` ended."""
        if backend.slot is not None:
            self.machine.release(backend.slot)

    def engine_failed(self, backend: Backend) -> None:
        """A request to a local engine broke off: the machine checks whether the engine died."""
        if backend.slot is not None and backend.handle is not None:
            self.machine.engine_failed(backend.slot, backend.handle)

    def retry_after(self, m: Model | None = None) -> float:
        return self.machine.retry_after(m)

    # -------------------------------------------------------------------------------------------- management
    async def start_model(self, name: str, port: int | None = None, util: float | None = None,
                          quant: str | None = None) -> tuple[Model, asyncio.Future[Any]]:
        """POST /api/local-engine/start: only a model the gateway may load (cached, or a configured profile) or a
        sleeping one; bad input is GatewayError(400) and changes nothing."""
        if name in VIRTUAL_MODELS:
            raise GatewayError(400, f"`model` {name!r} is a virtual name; name a cached model (GET "
                               "/api/local-engine/models lists them)", param="model", code="invalid_value")
        m = self.find(name)
        if m is None or not (m.loadable or m.state in (State.READY, State.SLEEPING, State.LOADING)):
            raise GatewayError(400, f"`model` {name!r} is not in the model cache and has no configured profile: "
                               f"pull it first (`sage-llm models pull {name}`, or the panel's Models tab); a local "
                               "directory is served through a [gateway.models.\"PATH\"] profile in the config file",
                               param="model", code="not_cached")
        if (util is not None or quant is not None) and m.profile is not None:
            m.profile = Profile(**{**m.profile.__dict__, "gpu_memory_utilization": util or
                                   m.profile.gpu_memory_utilization, "quantization": quant or m.profile.quantization})
        fut = self.machine.start(m, port)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # consumed: reported through events
        return m, fut

    async def stop_model(self, m: Model, reason: str = "requested") -> str:
        """Stop `m`: a model with replicas stops all of them (decided at once, so none is kept up meanwhile); a
        replica named by its engine stops alone (and is started again while its model is in use below
        min_replicas)."""
        members = [o for o in self.machine.group(m) if o is m or o.engine is not None or o.state in (
            State.LOADING, State.STOPPING)] if m.group is None else [m]
        futs = [self.machine.stop(o, reason) for o in members]
        done = await asyncio.shield(asyncio.gather(*futs, return_exceptions=True))
        for r in done:
            if isinstance(r, Refused):
                raise GatewayError.of(r)
            if isinstance(r, BaseException):
                raise r
        return "; ".join(str(r) for r in done)

    # -------------------------------------------------------------------------------------------- loops
    def start_loops(self) -> None:
        async def every(seconds: float, fn: Any) -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await fn()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a loop must survive one bad round
                    self.bus.publish("warning", error=f"{type(exc).__name__}: {exc}")

        async def tick() -> None:
            self.machine.tick()

        self._tasks = [asyncio.ensure_future(every(self.opts.refresh_s, self.refresh)),
                       asyncio.ensure_future(every(self.opts.tick_s, tick))]

    async def close(self, stop_engines: bool) -> list[str]:
        for t in self._tasks:
            t.cancel()
        self.machine.close()
        stopped = []
        if stop_engines:
            names = [m.engine.name for m in self.machine.models.values() if m.owned and m.engine is not None]
            names += [n for n in await asyncio.to_thread(engines.started_here) if n not in names]  # still loading
            results = await asyncio.gather(*(asyncio.to_thread(engines.stop, n) for n in names),
                                           return_exceptions=True)
            stopped = [n for n, r in zip(names, results) if not isinstance(r, BaseException)]
        return stopped
