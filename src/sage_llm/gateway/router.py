"""Model -> engine: on-demand loads, one lifecycle lock per model, LRU eviction, idle TTL, sleep/wake.

All state lives in the event loop's thread; blocking library calls (engines.py) run in worker threads. Rules:
* One `Slot` per model. Its `lock` serialises everything that changes its engine's lifecycle (load, wake, sleep,
  stop), so a TTL unload cannot race a load (lesson 1). Concurrent requests for a loading model all await the same
  load future, and all get the same answer: the engine, or the same diagnosis `start` would print.
* Only engines the gateway started (`owned`) are ever stopped, put to sleep or evicted; engines started with
  `sage-llm start` or outside sage-llm are routed to and left alone.
* An engine serving requests is never evicted or unloaded (`inflight`); the least recently used idle unpinned one is.
* A load that fails marks the model failed: requests get that diagnosis at once (503) for `FAILURE_HOLD_S` instead
  of a restart loop. An engine that dies while serving is restarted by the next request, once; a second crash within
  `CRASH_WINDOW_S` marks it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from sage_llm.core.errors import SageLLMError, UsageError
from sage_llm.gateway import engines
from sage_llm.gateway.events import EventBus
from sage_llm.gateway.metrics import Metrics
from sage_llm.gateway.options import VIRTUAL_MODELS, GatewayOptions, Profile

FAILURE_HOLD_S = 60.0
CACHE_RESCAN_S = 30.0  # the HF cache is rescanned when its directory changes, else at most this often
CRASH_WINDOW_S = 600.0
VRAM_SETTLE_S = (0.5, 1.0, 2.0)  # waits before retrying a start after an unload: free VRAM shows up late (lesson 6)


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


@dataclass
class Backend:
    """Where one request goes."""

    source: str  # local | cloud
    v1_base: str  # ... up to and including /v1
    root: str | None  # engine root URL for non-/v1 paths (local only)
    api_key: str | None
    engine: str  # engine name, or "cloud", or the --upstream model
    model: str | None  # rewrite the body's `model` to this (virtual names), else None
    slot: Slot | None = None


@dataclass
class Slot:
    key: str  # canonical model id (hub id, or the served name of an external engine)
    profile: Profile | None = None
    engine: engines.Engine | None = None
    state: str = "available"  # available | loading | ready | sleeping | stopping | failed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loading: asyncio.Future[engines.Engine] | None = None
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    error: str | None = None
    error_at: float = 0.0
    hold_until: float = 0.0  # while failed: no automatic load before this (monotonic)
    changed_at: float = 0.0  # last lifecycle change by the gateway (monotonic): newer than a refresh's snapshot wins
    crashes: list[float] = field(default_factory=list)
    stage: str | None = None
    progress: float | None = None
    cached: bool = False
    loaded_at: float | None = None

    @property
    def owned(self) -> bool:
        return self.engine is not None and self.engine.owned

    @property
    def loadable(self) -> bool:
        return self.profile is not None

    @property
    def pinned(self) -> bool:
        return bool(self.profile and self.profile.pinned)

    def to_card(self) -> dict[str, Any]:
        e = self.engine
        return {"id": self.key, "object": "model", "created": 0, "owned_by": "sage-llm",
                "state": self.state, "loadable": self.loadable, "engine": e.name if e else None,
                "managed_by_gateway": self.owned, "pinned": self.pinned,
                "aliases": list(self.profile.aliases) if self.profile else [], "error": self.error,
                "stage": self.stage, "progress": self.progress}


class Router:
    def __init__(self, opts: GatewayOptions, bus: EventBus, metrics: Metrics, own_ports: set[int]) -> None:
        self.opts = opts
        self.bus = bus
        self.metrics = metrics
        self.own_ports = own_ports
        self.slots: dict[str, Slot] = {}
        self.names: dict[str, str] = {}
        self.engines: list[engines.Engine] = []  # every engine seen at the last refresh
        self.views: list[Any] = []
        self.queued = 0
        self.session: Any = None  # aiohttp.ClientSession, set by the server
        self.cpu: bool | None = None
        self._refresh_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_settings: dict[str, dict[str, Any]] = {}
        self._cached: list[Any] = []
        self._cache_stamp: Any = None
        self._cache_read_at = 0.0
        for model, profile in opts.profiles.items():
            self._slot(model).profile = profile

    # -------------------------------------------------------------------------------------------- catalogue
    def _slot(self, key: str) -> Slot:
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key)
            self.names.setdefault(key, key)
        return slot

    def _alias(self, name: str | None, key: str) -> None:
        if name and name not in VIRTUAL_MODELS:
            self.names[name] = key

    def find(self, name: str) -> Slot | None:
        key = self.names.get(name)
        if key is None:
            for k, p in ((k, s.profile) for k, s in self.slots.items()):
                if p and name in p.aliases:
                    key = k
                    break
        return self.slots.get(key) if key else None

    def catalog(self) -> list[dict[str, Any]]:
        cards = [s.to_card() for s in self.slots.values()]
        for model in self.opts.upstreams:
            cards.append({"id": model, "object": "model", "created": 0, "owned_by": "upstream", "state": "ready",
                          "loadable": False, "engine": model, "managed_by_gateway": False, "pinned": False,
                          "aliases": [], "error": None, "stage": None, "progress": None})
        return sorted(cards, key=lambda c: ({"ready": 0, "loading": 1, "sleeping": 2}.get(c["state"], 3), c["id"]))

    def known_names(self) -> list[str]:
        return sorted({*self.slots, *self.opts.upstreams})

    async def refresh(self) -> None:
        """Re-read engines (records + external vLLMs), the HF cache and the profiles, and reconcile the slots."""
        async with self._refresh_lock:
            taken = time.monotonic()  # what happened to a slot after this is newer than the snapshot
            found, views = await asyncio.to_thread(engines.inspect, self.own_ports, True, self.opts.external)
            stamp = await asyncio.to_thread(engines.cache_stamp)
            now = time.monotonic()
            if stamp != self._cache_stamp or now - self._cache_read_at > CACHE_RESCAN_S:
                self._cached = await asyncio.to_thread(engines.cached_models)
                self._cache_stamp, self._cache_read_at = stamp, now
            cached = self._cached
            if self.cpu is None:
                self.cpu = await asyncio.to_thread(engines.is_cpu_engine)
        self.engines, self.views = found, views
        for m in cached:
            slot = self._slot(m.repo_id)
            slot.cached = True
            if slot.profile is None:
                slot.profile = Profile(model=m.repo_id, settings=self._last_settings.get(m.repo_id, {}))
        seen: set[str] = set()
        died = {e.name for e in found if e.state == "failed" and e.managed}
        for e in found:
            if e.state not in ("ready", "starting", "unhealthy"):
                continue
            key = e.model if e.managed and e.model else (e.served or e.model or e.name)
            slot = self._slot(key)
            seen.add(key)
            self._alias(e.served, key)
            self._alias(e.model, key)
            if e.managed and e.settings:
                self._last_settings[key] = e.settings
                if slot.profile is not None and not slot.profile.configured:
                    slot.profile.settings = e.settings
            # a load or stop of the gateway's own holds the slot's lock; a "loading" that only mirrors an engine
            # seen starting (one the gateway did not start) must follow that engine, or it would stay loading forever
            if slot.state == "stopping" or slot.lock.locked() or slot.changed_at >= taken:
                continue
            if slot.state == "sleeping" and slot.engine and slot.engine.name == e.name:
                continue
            if e.managed and e.model and slot.profile is None:
                slot.profile = Profile(model=e.model, settings=e.settings)
            if (slot.state == "ready" and slot.engine is not None and slot.engine.name == e.name
                    and e.state == "unhealthy"):
                continue  # a slow probe under load is not a failure: the proxy notices a dead engine itself
            if slot.engine is None or slot.engine.name == e.name or slot.engine.state != "ready":
                adopted = slot.engine is None and e.owned
                slot.engine = e
                slot.state = "ready" if e.state == "ready" else "loading" if e.state == "starting" else "failed"
                slot.error = e.error if e.state != "ready" else None
                slot.stage, slot.progress = e.stage, e.progress
                if adopted and e.state == "ready":
                    slot.last_used = time.monotonic()
                    self.bus.publish("adopted", model=key, engine=e.name)
        for key, slot in self.slots.items():
            if (key in seen or slot.engine is None or slot.state == "stopping" or slot.lock.locked()
                    or slot.changed_at >= taken):
                continue
            if slot.engine.static:
                continue
            gone = slot.engine
            if gone.name in died and gone.owned and slot.state in ("ready", "sleeping"):
                self._crashed(slot, gone)  # its record says it died: a crash, not a stop
                continue
            slot.engine = None
            if slot.state in ("ready", "sleeping", "loading"):
                slot.state = "available" if slot.loadable else "gone"
                self.bus.publish("stopped", model=key, engine=gone.name, reason="engine gone")
        for key in [k for k, s in self.slots.items() if s.state == "gone"]:
            del self.slots[key]
            for n in [n for n, k in self.names.items() if k == key]:
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

    def _local_default(self) -> Slot | None:
        """The model `local`/`auto` mean: the ready engine Studio's LocalEngineStatus names, else the default
        model (SAGE_LOCAL_ENGINE_DEFAULT_MODEL) when it can be loaded."""
        from sage_llm.core import settings

        local = engines.local_engine_status(self.views) if self.views else {"running": False}
        if local.get("running"):
            slot = self.find(local["model"])
            if slot is not None and slot.state == "ready":
                return slot
        for slot in self.slots.values():
            if slot.state == "ready" and slot.engine is not None:
                return slot
        slot = self.find(settings.get("default_model"))
        return slot if slot is not None and slot.loadable else None

    async def route(self, model: str | None, load: bool = True) -> Backend:
        """Where a request naming `model` goes; loads the model first if needed (may wait). With `load=False` (GET
        requests: no state change on a GET) only a model already being served is routed to."""
        name = model or "auto"
        if name in self.opts.upstreams:
            return Backend("local", self.opts.upstreams[name], None, None, name, None)
        if not load:
            slot = self.find(name)
            if slot is None or slot.state != "ready" or slot.engine is None:
                raise GatewayError(409, f"model {name!r} is not loaded; a GET never loads a model (send a POST "
                                   "request naming it, or POST /api/local-engine/start)", code="model_not_loaded",
                                   param="model")
            return self._local(slot, slot.engine, rewrite=None)
        if name in VIRTUAL_MODELS:
            if name == "cloud":
                return self._cloud(None, True)
            slot = self._local_default()
            if slot is None:
                if name == "auto" and self.opts.fallback:
                    return self._cloud(None, True)
                raise GatewayError(503, "no local model is ready or loadable (set SAGE_LOCAL_ENGINE_DEFAULT_MODEL "
                                   "to a cached model, or name one)", "service_unavailable", "no_local_model")
            try:
                engine = await self.acquire(slot)
            except GatewayError:
                if name == "auto" and self.opts.fallback:
                    return self._cloud(None, True)
                raise
            return self._local(slot, engine, rewrite=engine.served or slot.key)
        slot = self.find(name)
        if slot is None or (slot.engine is None and not slot.loadable):
            if self.opts.fallback:
                with contextlib.suppress(GatewayError):
                    return self._cloud(name, False)
            shown = ", ".join(self.known_names()) or "none"
            raise GatewayError(404, f"The model `{name}` does not exist here. Models: {shown}",
                               code="model_not_found", param="model")
        engine = await self.acquire(slot)
        served = engine.served or slot.key
        return self._local(slot, engine, rewrite=served if served != name else None)

    def _local(self, slot: Slot, engine: engines.Engine, rewrite: str | None) -> Backend:
        return Backend("local", engine.base_url + "/v1", engine.base_url, engine.api_key, engine.name, rewrite, slot)

    def begin(self, slot: Slot | None) -> None:
        if slot is not None:
            slot.inflight += 1
            slot.last_used = time.monotonic()

    def end(self, slot: Slot | None) -> None:
        if slot is not None:
            slot.inflight = max(0, slot.inflight - 1)
            slot.last_used = time.monotonic()

    # -------------------------------------------------------------------------------------------- loading
    def retry_after(self, slot: Slot | None = None) -> float:
        known = self.metrics.load_seconds.get(slot.key) if slot else None
        return max(1.0, round(known or 30.0))

    async def acquire(self, slot: Slot) -> engines.Engine:
        """The ready engine of `slot`, loading (or waking) it first; every waiter shares one load."""
        for _ in range(3):
            if slot.state == "ready" and slot.engine is not None:
                return slot.engine
            if slot.loading is None:
                if slot.state == "failed" and time.monotonic() < slot.hold_until:
                    raise GatewayError(503, f"model {slot.key} failed: {slot.error}", "service_unavailable",
                                       "model_load_failed", retry_after=max(1.0, slot.hold_until - time.monotonic()))
                if not slot.loadable:
                    raise GatewayError(503, f"model {slot.key} is {slot.state} and the gateway cannot start it "
                                       "(not cached, not configured)", "service_unavailable", "not_loadable")
                slot.loading = asyncio.ensure_future(self._load(slot))
            if self.queued >= self.opts.max_queue:
                raise GatewayError(503, f"{self.queued} requests are already waiting for models to load "
                                   f"(--max-queue {self.opts.max_queue}); try again shortly", "service_unavailable",
                                   "queue_full", retry_after=self.retry_after(slot))
            self.queued += 1
            try:
                await asyncio.shield(slot.loading)
            finally:
                self.queued -= 1
        if slot.state == "ready" and slot.engine is not None:
            return slot.engine
        raise GatewayError(503, f"model {slot.key} could not be kept loaded (evicted while loading)",
                           "service_unavailable", "model_unstable", retry_after=self.retry_after(slot))

    async def _load(self, slot: Slot, port: int | None = None) -> engines.Engine:
        t0 = time.monotonic()
        try:
            async with slot.lock:
                if slot.state == "ready" and slot.engine is not None:
                    return slot.engine
                if slot.state == "sleeping" and slot.engine is not None:
                    woke = await self._wake(slot)
                    if woke:
                        return slot.engine
                assert slot.profile is not None
                slot.state, slot.stage, slot.progress, slot.error = "loading", "launching", None, None
                self.bus.publish("loading", model=slot.key, stage="launching", progress=None)
                engine = await self._start(slot, port)
                slot.engine, slot.state = engine, "ready"
                slot.stage, slot.progress, slot.loaded_at = "ready", 1.0, time.time()
                slot.last_used = time.monotonic()
                took = time.monotonic() - t0
                self.metrics.load(slot.key, True, took)
                self.bus.publish("ready", model=slot.key, engine=engine.name, load_s=round(took, 3))
                return engine
        except GatewayError as exc:
            slot.state = "available" if exc.code in ("no_memory", "queue_full") else "failed"
            slot.error, slot.error_at = exc.message, time.monotonic()
            slot.hold_until = slot.error_at + FAILURE_HOLD_S if slot.state == "failed" else 0.0
            self.metrics.load(slot.key, False)
            self.bus.publish("failed", model=slot.key, error=exc.message)
            raise
        except UsageError as exc:  # bad input (e.g. a model name vLLM cannot take): nothing was started
            slot.state, slot.engine = "available", None
            raise GatewayError(400, exc.message + (f" (hint: {exc.hint})" if exc.hint else ""),
                               code="invalid_value", param="model") from None
        except SageLLMError as exc:
            msg = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
            slot.state, slot.error, slot.error_at, slot.engine = "failed", msg, time.monotonic(), None
            slot.hold_until = slot.error_at + FAILURE_HOLD_S
            self.metrics.load(slot.key, False)
            self.bus.publish("failed", model=slot.key, error=msg)
            raise GatewayError(503, f"model {slot.key} failed to load: {msg}", "service_unavailable",
                               "model_load_failed", retry_after=FAILURE_HOLD_S) from None
        except BaseException as exc:
            slot.state, slot.error, slot.error_at = "failed", f"{type(exc).__name__}: {exc}", time.monotonic()
            self.bus.publish("failed", model=slot.key, error=slot.error)
            raise
        finally:
            slot.loading = None
            slot.changed_at = time.monotonic()

    async def _start(self, slot: Slot, port: int | None) -> engines.Engine:
        from sage_llm.engine.placement import InsufficientGpuMemory

        await self._make_room(slot)
        loop = asyncio.get_running_loop()
        last: list[Any] = [None]

        def on_progress(info: dict[str, Any]) -> None:  # worker thread
            now = (info.get("stage"), None if info.get("progress") is None else round(info["progress"], 2))
            if now == last[0]:
                return
            last[0] = now

            def apply() -> None:
                slot.stage, slot.progress = now
                self.bus.publish("loading", model=slot.key, stage=now[0], progress=now[1],
                                 detail=info.get("detail"), elapsed_s=round(info.get("elapsed_s") or 0, 2))
            loop.call_soon_threadsafe(apply)

        waits = list(VRAM_SETTLE_S)
        while True:
            try:
                return await asyncio.to_thread(engines.start, slot.profile, self.opts.engine_port,
                                               self.opts.load_timeout, on_progress, self.opts.sleep, port)
            except (InsufficientGpuMemory, engines.NotEnoughMemory) as exc:
                if await self._evict_one(exclude=slot, reason="evicted"):
                    continue
                if waits and self._recently_freed():
                    await asyncio.sleep(waits.pop(0))
                    continue
                raise GatewayError(503, f"cannot load {slot.key}: {exc.message}; no idle engine of the gateway can "
                                   "be unloaded to make room" + (f" (hint: {exc.hint})" if exc.hint else ""),
                                   "service_unavailable", "no_memory", retry_after=self.retry_after(slot)) from None

    def _recently_freed(self) -> bool:
        return bool(getattr(self, "_freed_at", 0) and time.monotonic() - self._freed_at < 5.0)

    async def _make_room(self, slot: Slot) -> None:
        if not self.opts.max_engines:
            return
        while True:
            awake = [s for s in self.slots.values() if s is not slot and s.owned and s.state in ("ready", "loading")]
            if len(awake) < self.opts.max_engines:
                return
            if not await self._evict_one(exclude=slot, reason="evicted"):
                busy = ", ".join(f"{s.key} ({'pinned' if s.pinned else f'{s.inflight} in flight'})" for s in awake)
                raise GatewayError(503, f"--max-engines {self.opts.max_engines} reached and no engine can be unloaded:"
                                   f" {busy}", "service_unavailable", "no_memory",
                                   retry_after=self.retry_after(slot))

    def _victims(self, exclude: Slot | None) -> list[Slot]:
        return sorted((s for s in self.slots.values()
                       if s is not exclude and s.owned and s.state in ("ready", "sleeping") and s.inflight == 0
                       and not s.pinned and not s.lock.locked()),
                      key=lambda s: s.last_used)

    async def _evict_one(self, exclude: Slot | None, reason: str) -> bool:
        """Free the least recently used idle unpinned engine: sleep it (GPU, --sleep) or stop it."""
        for victim in self._victims(exclude):
            if (victim.state == "ready" and self.opts.sleep and not self.cpu
                    and await asyncio.to_thread(engines.host_ram_holds, victim.engine and victim.engine.model)
                    and await self._sleep(victim)):
                return True
            if await self.unload(victim, reason):
                return True
        return False

    async def unload(self, slot: Slot, reason: str) -> bool:
        """Stop `slot`'s engine if it is idle (under its lifecycle lock); False if it was busy or is not ours."""
        async with slot.lock:
            if slot.engine is None or not slot.owned or slot.inflight or slot.state not in ("ready", "sleeping"):
                return False
            engine = slot.engine
            slot.state = "stopping"
            self.bus.publish("stopping", model=slot.key, engine=engine.name, reason=reason)
            try:
                await asyncio.to_thread(engines.stop, engine.name)
            except SageLLMError as exc:
                slot.state, slot.error = "failed", exc.message
                self.bus.publish("failed", model=slot.key, engine=engine.name, error=exc.message)
                return False
            slot.engine, slot.state, slot.stage, slot.progress = None, "available", None, None
            self._freed_at = slot.changed_at = time.monotonic()
            self.metrics.unload(slot.key, reason)
            self.bus.publish("stopped", model=slot.key, engine=engine.name, reason=reason)
            return True

    async def stop_model(self, slot: Slot, reason: str = "requested") -> str:
        """POST /api/local-engine/stop: stop any managed engine of `slot` (waits for in-flight requests? no: the
        caller asked; requests in flight end with an error)."""
        async with slot.lock:
            engine = slot.engine
            if engine is None:
                return f"{slot.key} is not running"
            if not engine.managed:
                raise GatewayError(409, f"engine {engine.name} was not started by sage-llm; not touching it",
                                   code="not_managed")
            slot.state = "stopping"
            self.bus.publish("stopping", model=slot.key, engine=engine.name, reason=reason)
            try:
                msg = await asyncio.to_thread(engines.stop, engine.name)
            except SageLLMError as exc:
                slot.state, slot.error = "failed", exc.message
                raise GatewayError(500, exc.message, "server_error", "stop_failed") from None
            slot.engine, slot.state = None, "available" if slot.loadable else "gone"
            slot.changed_at = time.monotonic()
            self.metrics.unload(slot.key, reason)
            self.bus.publish("stopped", model=slot.key, engine=engine.name, reason=reason)
            if slot.state == "gone":
                slot.state = "available"
                slot.profile = slot.profile or Profile(model=slot.key)
            return msg

    async def start_model(self, slot: Slot, port: int | None = None) -> asyncio.Future[engines.Engine]:
        """POST /api/local-engine/start: begin a load now (clears a held failure)."""
        if slot.state == "failed":
            slot.state, slot.hold_until = "available", 0.0
        if slot.loading is None and not (slot.state == "ready" and slot.engine is not None):
            slot.loading = asyncio.ensure_future(self._load(slot, port))
        if slot.loading is None:
            fut: asyncio.Future[engines.Engine] = asyncio.get_running_loop().create_future()
            fut.set_result(slot.engine)  # type: ignore[arg-type]
            return fut
        return slot.loading

    # -------------------------------------------------------------------------------------------- sleep
    async def _sleep(self, slot: Slot) -> bool:
        async with slot.lock:
            if slot.engine is None or slot.inflight or slot.state != "ready":
                return False
            try:
                ok = await engines.sleep(self.session, slot.engine, level=1)
            except Exception:
                ok = False
            if ok:
                slot.state = "sleeping"
                self._freed_at = slot.changed_at = time.monotonic()
                self.metrics.unload(slot.key, "slept")
                self.bus.publish("sleeping", model=slot.key, engine=slot.engine.name, level=1)
            return ok

    async def _wake(self, slot: Slot) -> bool:
        assert slot.engine is not None
        self.bus.publish("waking", model=slot.key, engine=slot.engine.name)
        try:
            ok = await engines.wake(self.session, slot.engine)
        except Exception:
            ok = False
        if ok:
            slot.state, slot.last_used = "ready", time.monotonic()
            self.bus.publish("ready", model=slot.key, engine=slot.engine.name, woke=True)
            return True
        # could not wake: stop it and load afresh
        slot.state = "ready"
        name = slot.engine.name
        with contextlib.suppress(SageLLMError):
            await asyncio.to_thread(engines.stop, name)
        slot.engine, slot.state = None, "available"
        return False

    # -------------------------------------------------------------------------------------------- failures
    async def engine_failed(self, slot: Slot | None, engine_name: str) -> None:
        """A request to `slot`'s engine broke off: if the engine died, mark it; restart once on the next request."""
        if slot is None or slot.engine is None or slot.engine.name != engine_name:
            return
        engine = slot.engine
        if await asyncio.to_thread(engines.alive, engine):
            return
        if slot.engine is not engine:
            return  # the refresh loop saw it first
        self._crashed(slot, engine)
        if engine.managed:
            with contextlib.suppress(SageLLMError):
                await asyncio.to_thread(engines.stop, engine.name)  # sweep what is left, drop the record

    def _crashed(self, slot: Slot, engine: engines.Engine) -> None:
        """`slot`'s engine died (not stopped by anyone): count it; a second death in CRASH_WINDOW_S holds the model
        failed (reported, not restarted in a loop), else the next request restarts it."""
        now = time.monotonic()
        slot.crashes = [t for t in slot.crashes if now - t < CRASH_WINDOW_S] + [now]
        slot.engine, slot.changed_at = None, now
        if len(slot.crashes) >= 2:
            slot.state, slot.error, slot.error_at = "failed", (
                f"engine {engine.name} died {len(slot.crashes)} times in {int(CRASH_WINDOW_S / 60)} minutes; not "
                f"restarting it automatically (see `sage-llm logs {engine.name}`; POST /api/local-engine/start "
                "retries)"), now
            slot.hold_until = now + CRASH_WINDOW_S
        else:
            slot.state = "available" if slot.loadable else "gone"
            slot.error = f"engine {engine.name} died; the next request restarts it"
        self.bus.publish("failed", model=slot.key, engine=engine.name, error=slot.error)

    # -------------------------------------------------------------------------------------------- loops
    async def ttl_tick(self) -> None:
        now = time.monotonic()
        for slot in list(self.slots.values()):
            if not slot.owned or slot.pinned or slot.inflight or slot.state not in ("ready", "sleeping"):
                continue
            ttl = slot.profile.ttl if slot.profile and slot.profile.ttl is not None else self.opts.ttl
            if ttl > 0 and now - slot.last_used >= ttl and not slot.lock.locked():
                await self.unload(slot, "idle")

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

        self._tasks = [asyncio.ensure_future(every(self.opts.refresh_s, self.refresh)),
                       asyncio.ensure_future(every(self.opts.tick_s, self.ttl_tick))]

    async def close(self, stop_engines: bool) -> list[str]:
        for t in self._tasks:
            t.cancel()
        for slot in self.slots.values():
            if slot.loading is not None:
                slot.loading.cancel()
        stopped = []
        if stop_engines:
            names = [s.engine.name for s in self.slots.values() if s.owned and s.engine is not None]
            names += [n for n in await asyncio.to_thread(engines.started_here) if n not in names]  # still loading
            results = await asyncio.gather(*(asyncio.to_thread(engines.stop, n) for n in names),
                                           return_exceptions=True)
            stopped = [n for n, r in zip(names, results) if not isinstance(r, BaseException)]
        return stopped
