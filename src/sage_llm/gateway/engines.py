"""The gateway's one door to the engine library: start, stop, inspect, cached models, sleep/wake.

Everything else in the gateway talks to engines through here, so that moving to the typed core API (`sage_llm.api`)
touches this file only. Blocking functions are called from the gateway's event loop through `asyncio.to_thread`.

Engines the gateway starts are ordinary managed engines (records in the state directory: `status`, `logs`, `stop`
work on them) with one difference: each gets its own API key, which vLLM reads from VLLM_API_KEY in its environment
(never argv). The record holds only the key's variable name, `SAGE_LLM_GW_KEY_<hex>`; the key itself is an HMAC of
that name under the gateway secret (`gateway.key` in the state directory, 0600), so a gateway restarted after a crash
recomputes the keys of the engines it adopts, and a web page cannot reach an engine it does not know the key of.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_llm.core import engine_keys
from sage_llm.core.errors import SageLLMError
from sage_llm.gateway import cluster_link
from sage_llm.gateway.cluster_link import LINK

KEY_PREFIX = engine_keys.KEY_PREFIX


class NotEnoughMemory(SageLLMError):
    """The engine would not fit (GPU per start's pre-flight rule, or host RAM for a CPU engine)."""


@dataclass
class Engine:
    """One engine as the gateway routes to it."""

    name: str
    model: str | None  # what it was started from (hub id or path)
    served: str | None  # the name its /v1/models lists
    base_url: str  # http://127.0.0.1:PORT  (no /v1)
    state: str  # ready | starting | unhealthy | failed | stopped
    managed: bool  # a sage-llm record exists
    owned: bool  # started by a gateway (has a gateway key)
    api_key: str | None = None
    port: int | None = None
    pid: int | None = None
    error: str | None = None
    gpu_memory_bytes: int | None = None
    started_at: str | None = None
    max_model_len: int | None = None  # the context it serves (/v1/models, else its record)
    settings: dict[str, Any] = field(default_factory=dict)
    stage: str | None = None
    progress: float | None = None
    static: bool = False  # a --upstream route
    node: str | None = None  # the Ray node it runs on (engines placed on a cluster): its address; None: this machine
    node_id: str | None = None  # that node's Ray id (what identifies it: loopback clusters share one address)

    def names(self) -> set[str]:
        return {n for n in (self.served, self.model) if n}


# ------------------------------------------------------------------------------------------------------ keys
def key_for(var: str) -> str:
    """The API key of the engine whose record names `var` (core/engine_keys.py: derived from the gateway's secret, so
    a restarted gateway finds it again). It never enters this process's environment: `start` hands it to the engine
    alone."""
    key = engine_keys.key_for(var, create=True)
    assert key is not None
    return key


_STARTED: set[str] = set()  # key variables of the engines this process started (loading ones included)


def new_key_var() -> str:
    var = KEY_PREFIX + secrets.token_hex(6).upper()
    _STARTED.add(var)
    return var


def started_here() -> list[str]:
    """Names of the recorded engines this process started, including those still loading."""
    from sage_llm.core.state import EngineRecord, StateStore

    return [r.name for r in StateStore().all() if isinstance(r, EngineRecord) and start_token(r) in _STARTED]


def is_owned(api_key_env: str | None) -> bool:
    return engine_keys.is_gateway_key(api_key_env)


def start_token(rec: Any) -> str | None:
    """What marks an engine as a gateway's and names the start that made it: the key variable of an engine of this
    machine (SAGE_LLM_GW_KEY_<hex>), the `gateway` entry of a cluster engine's record (its key is the cluster's
    variable, the same for every engine on the nodes). None: not a gateway's engine."""
    if is_owned(rec.api_key_env):
        return str(rec.api_key_env)
    token = (rec.cluster or {}).get("gateway")
    return str(token) if token else None


# ------------------------------------------------------------------------------------------------------ inspect
def local_port() -> int:
    from sage_llm.engine import status

    return status.local_port()


def inspect(exclude_ports: set[int] | None = None, with_gpu: bool = True, external: bool = True
            ) -> tuple[list[Engine], list[Any]]:
    """Every engine alive now (managed records, then external vLLM servers found like `status` finds them), plus the
    raw EngineViews (for LocalEngineStatus). Ports in `exclude_ports` (the gateway's own) are skipped."""
    from sage_llm import api
    from sage_llm.core.addresses import url_host
    from sage_llm.core.state import api_key_for
    from sage_llm.engine import status

    views = api.engines(include_external=external)
    views = [v for v in views if not (exclude_ports and v.port in exclude_ports and not v.managed)]
    views = [v for v in views if v.managed or ours(v.pid)]  # another user's server: not ours to route to (`ours`)
    if with_gpu:
        with contextlib.suppress(Exception):
            status.attach_gpu(views)
    out = []
    for v in views:
        if v.port is None or v.state == "stopped":
            continue
        rec = v.record
        owned = rec is not None and start_token(rec) is not None
        key = None
        if rec is not None and is_owned(rec.api_key_env):
            key = key_for(rec.api_key_env)
        elif rec is not None:
            key = api_key_for(rec)  # a cluster engine's: the cluster key variable of this environment
        host = url_host(v.host or "127.0.0.1")
        out.append(Engine(name=v.name or f"external-{v.port}", model=v.model, served=v.served_model_name,
                          base_url=f"http://{host}:{v.port}", state=v.state, managed=v.managed, owned=owned,
                          api_key=key, port=v.port, pid=v.pid, error=v.error, gpu_memory_bytes=v.gpu_memory_bytes,
                          started_at=v.started_at, max_model_len=v.max_model_len, settings=dict(v.settings or {}),
                          stage=v.stage, progress=v.progress, node=v.node,
                          node_id=(v.cluster or {}).get("node_id")))
    return out, views


OWN_UID = os.getuid() if hasattr(os, "getuid") else None


def ours(pid: int | None) -> bool:
    """Is process `pid` this user's? An external engine (one with no record of ours) is only trusted when the process
    listening on its port runs under the gateway's own uid: on a machine with several users, anyone can start a
    server on a free loopback port that looks like vLLM, and routing a model's traffic (prompts, answers) to it would
    hand them to that user. A listener whose process we cannot see (another user's, without privileges) is refused
    too."""
    if OWN_UID is None:
        return True
    if pid is None:
        return False
    import psutil

    try:
        return bool(psutil.Process(pid).uids().real == OWN_UID)
    except psutil.Error:
        return False


def local_engine_status(views: list[Any]) -> dict[str, Any]:
    """The seed's LocalEngineStatus, computed exactly as `status --json` computes `local_engine`."""
    from sage_llm.engine.view import local_engine

    return dict(local_engine(views, local_port()))


def status_document() -> dict[str, Any]:
    """The full `status --json` document."""
    from sage_llm.engine import status

    doc, _views, _warnings = status.build()
    return doc


def alive(engine: Engine) -> bool:
    """Is the engine's process still there (after a failed request: did it die)?"""
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import process

    if engine.managed:
        rec = StateStore().load(engine.name)
        if not isinstance(rec, EngineRecord):
            return False
        return process.leader(rec.pid, rec.create_time) is not None
    if engine.pid is None:
        return True
    import psutil

    try:
        return psutil.Process(engine.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def alive_state(engine: Engine) -> str:
    """After a request to `engine` broke off: "alive", "stopped" (its record is gone or says it is being stopped: a
    deliberate stop, e.g. `sage-llm stop`, not a crash) or "died" (its record says it runs, its process is gone)."""
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import process

    if engine.managed:
        rec = StateStore().load(engine.name)
        if not isinstance(rec, EngineRecord) or rec.state == "stopping":
            return "stopped"
        if rec.cluster:
            try:
                said = LINK.call("liveness", name=engine.name)
            except SageLLMError:
                said = "unknown"  # the cluster does not answer: the next refresh says more
            if said == "lost" and rec.cluster.get("node_id"):  # its node may be going down before Ray says so
                with _SUSPECTS_LOCK:
                    SUSPECTS[rec.cluster["node_id"]] = time.monotonic() + SUSPECT_S
            return "died" if said in ("died", "lost") else "alive"  # unknown: the next refresh asks its agent
        return "alive" if process.leader(rec.pid, rec.create_time) is not None else "died"
    return "alive" if alive(engine) else "died"


SUSPECT_S = 60.0
SUSPECTS: dict[str, float] = {}  # node id -> until when: an engine there died and its agent did not answer
_SUSPECTS_LOCK = threading.Lock()  # written and read by the effects' worker threads


def suspects() -> set[str]:
    """Nodes where an engine just died without its agent answering (a node dying before Ray says so): new engines
    are preferably placed elsewhere for a minute."""
    now = time.monotonic()
    with _SUSPECTS_LOCK:
        for node in [n for n, until in SUSPECTS.items() if until <= now]:
            del SUSPECTS[node]
        return set(SUSPECTS)


def cache_stamp() -> Any:
    """Changes when a model repo is added to or removed from the hub cache (its directory's mtime)."""
    from sage_llm.models import hf_cache

    try:
        st = hf_cache.hub_cache_dir().stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino)


def cached_models() -> list[Any]:
    """Complete models in the Hugging Face cache (hf_cache.LocalModel)."""
    from sage_llm.models import hf_cache

    try:
        return [m for m in hf_cache.list_models() if m.complete and not m.incomplete and not m.error]
    except Exception:
        return []


# ------------------------------------------------------------------------------------------------------ start/stop
def host_memory_check(model: str, cpu_engine: bool) -> None:
    """For a CPU engine: the weights plus vLLM's CPU KV cache must fit in available host RAM."""
    if not cpu_engine:
        return
    import psutil

    from sage_llm.core.config import DEFAULT_CPU_KVCACHE_GIB
    from sage_llm.models import hf_cache

    size = 0
    with contextlib.suppress(Exception):
        for m in hf_cache.list_models():
            if m.repo_id == model:
                size = m.size_on_disk
    kv = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or DEFAULT_CPU_KVCACHE_GIB) * 1024**3
    need = size + kv
    avail = psutil.virtual_memory().available
    if need > avail:
        raise NotEnoughMemory(f"{model} needs about {need / 1024**3:.1f} GiB of host memory (weights + KV cache), "
                              f"{avail / 1024**3:.1f} GiB is available",
                              hint="stop an engine, or lower VLLM_CPU_KVCACHE_SPACE")


def host_ram_holds(model: str | None) -> bool:
    """Sleep level 1 moves the weights to host RAM: is there room for them (their size on disk, plus 10 %)?"""
    import psutil

    from sage_llm.models import hf_cache

    size = None
    with contextlib.suppress(Exception):
        size = next((m.size_on_disk for m in hf_cache.list_models() if m.repo_id == model), None)
    if size is None:
        return False  # unknown size: stop rather than risk the host's memory
    return size * 1.1 < psutil.virtual_memory().available


def is_cpu_engine() -> bool:
    from sage_llm.core.state import StateStore
    from sage_llm.engine import envs
    from sage_llm.observe import gpu

    try:
        cmd = envs.resolve_vllm(StateStore().root)
    except Exception:
        return gpu.gpu_count() == 0
    return cmd.kind == "cpu" or (cmd.kind is None and gpu.gpu_count() == 0)


def launch_request(profile: Any, **given: Any) -> Any:
    """The api.LaunchRequest for `profile`: its own settings, else those its model's last engine was started with
    (`profile.settings`); `given` adds the rest (port, key variable, extra arguments, timeout, cluster...)."""
    from sage_llm import api

    last = dict(profile.settings or {})
    return api.LaunchRequest(
        model=profile.model, host="127.0.0.1", name=profile.engine_name(), wait=True,
        served_model_name=last.get("served_model_name") if not profile.configured else None,
        quantization=profile.quantization or last.get("quantization"),
        max_model_len=profile.max_model_len or last.get("max_model_len"),
        tensor_parallel_size=last.get("tensor_parallel_size"),
        pipeline_parallel_size=last.get("pipeline_parallel_size"), dtype=last.get("dtype"),
        enforce_eager=bool(last.get("enforce_eager")), download_dir=last.get("download_dir"),
        trust_remote_code=bool(last.get("trust_remote_code")), **given)


def extra_args(profile: Any) -> list[str]:
    """vLLM arguments for `profile`: its own, else those its model's last engine was started with."""
    last = dict(profile.settings or {})
    return list(profile.args) if profile.configured or profile.args else list(last.get("extra_args") or [])


def start(profile: Any, engine_port: int, timeout: float, on_progress: Any = None, sleep_mode: bool = False,
          port: int | None = None, var: str | None = None) -> Engine:
    """Start `profile.model` through sage_llm.api (blocking until it serves, or raising the same EngineFailed `start`
    raises: same words) as a managed engine with its own key. InsufficientGpuMemory / NotEnoughMemory when it would
    not fit. The key and the dev-mode switch go to the engine's environment only, never to the gateway's."""
    from sage_llm import api
    from sage_llm.core import settings

    cpu = is_cpu_engine()
    host_memory_check(profile.model, cpu)
    last = dict(profile.settings or {})
    util = profile.gpu_memory_utilization or last.get("gpu_memory_utilization") or settings.get("gpu_util")
    extra = extra_args(profile)
    if sleep_mode and not cpu and "--enable-sleep-mode" not in extra:
        extra.append("--enable-sleep-mode")
    from sage_llm.gateway import engine_env as inherited

    var = var or new_key_var()
    engine_env = {**inherited.overrides(), var: key_for(var)}  # no gateway secrets, no vLLM switch that opens it up
    if sleep_mode and not cpu:
        engine_env[SLEEP_ENV] = "1"  # sleep routes exist only in dev mode; the engine stays on loopback
    launch = api.resolve_launch(launch_request(profile, port=port or engine_port, gpu_memory_utilization=float(util),
                                               api_key_env=var, extra_args=extra, timeout=timeout,
                                               engine_env=engine_env))
    launch.port_explicit = port is not None
    result = api.start(launch, on_progress=on_progress)
    rec = result.record
    return Engine(name=rec.name, model=rec.model, served=rec.served_model_name, base_url=f"http://127.0.0.1:{rec.port}",
                  state="ready", managed=True, owned=is_owned(rec.api_key_env), api_key=key_for(rec.api_key_env)
                  if is_owned(rec.api_key_env) else None, port=rec.port, pid=rec.pid,
                  started_at=rec.started_at, settings=dict(rec.settings or {}))


def start_on_cluster(profile: Any, opts: Any, timeout: float, on_progress: Any = None, token: str | None = None,
                     near: str | None = None) -> Engine:
    """Start `profile.model` on a node of `opts.cluster` through its agent (engine/cluster.py), as the gateway's
    engine (`token` in its record). Its key is the cluster's variable, read on the node; Ray's accounting places it
    (`profile.node` pins it; `near`, a node where room was just made, is preferred; replicas of the model prefer
    nodes without one). cluster.NotPlaced when no node has its GPUs free within opts.place_s."""
    from sage_llm import api
    from sage_llm.core.errors import EngineFailed
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import cluster

    last = dict(profile.settings or {})
    launch = api.resolve_launch(launch_request(
        profile, port=opts.engine_port, api_key_env=opts.cluster_key_env, timeout=timeout, cluster=opts.cluster,
        node=profile.node, gpu_memory_utilization=profile.gpu_memory_utilization or last.get("gpu_memory_utilization"),
        extra_args=extra_args(profile)))
    spread: dict[str, int] = {}
    for r in StateStore().all():  # where this model's engines already run: a new replica prefers another node
        if isinstance(r, EngineRecord) and r.cluster and r.model == profile.model and r.cluster.get("node_id"):
            spread[r.cluster["node_id"]] = spread.get(r.cluster["node_id"], 0) + 1
    name = LINK.call("start", limit=launch.timeout + 120, on_progress=on_progress, spec=cluster.spec_doc(launch.spec),
                     address=opts.cluster, node=launch.node, name=launch.name, timeout=launch.timeout, owner=token,
                     prefer=near, place_within=opts.place_s, spread=spread, avoid=sorted(suspects()))
    rec = StateStore().load(name)
    if not isinstance(rec, EngineRecord):
        raise EngineFailed(f"engine {name!r} came up on the cluster but its record is gone (stopped meanwhile?)")
    from sage_llm.core.addresses import reachable_host, url_host
    from sage_llm.observe import probe

    key = os.environ.get(opts.cluster_key_env)
    seen = probe.probe(reachable_host(rec.host), int(rec.port), timeout=5.0, api_key=key)
    if seen.models_status == 401:  # the node's variable holds another key: every request would be refused
        node = (rec.cluster or {}).get("node_ip")
        with contextlib.suppress(SageLLMError):
            stop(rec.name)
        raise EngineFailed(f"the engine on node {node} refuses this gateway's key: ${opts.cluster_key_env} on the "
                           "node differs from this machine's",
                           hint=f"set the same {opts.cluster_key_env} in the environment of `ray start` on every node "
                                "and of the gateway, then restart those")
    return Engine(name=rec.name, model=rec.model, served=rec.served_model_name,
                  base_url=f"http://{url_host(rec.host)}:{rec.port}", state="ready", managed=True, owned=True,
                  api_key=os.environ.get(opts.cluster_key_env), port=rec.port, started_at=rec.started_at,
                  settings=dict(rec.settings or {}), node=(rec.cluster or {}).get("node_ip"),
                  node_id=(rec.cluster or {}).get("node_id"))


def stop(name: str, timeout: float | None = None) -> str:
    """Stop a managed engine (whole process tree, verified) through sage_llm.api, or through the gateway's Ray worker
    for an engine on a cluster; returns the outcome's message."""
    from sage_llm import api
    from sage_llm.core.state import EngineRecord, StateStore

    rec = StateStore().load(name)
    if isinstance(rec, EngineRecord) and rec.cluster:
        done = LINK.call("stop", name=name, grace=api.stop_grace(timeout))
        stopped, message = bool(done["stopped"]), str(done["message"])
    else:
        outcome = api.stop(name, timeout=timeout)
        stopped, message = outcome.stopped, outcome.message
    if not stopped:
        raise SageLLMError(message, hint=f"see `sage-llm status {name}`")
    return message


def use_cluster_link(address: str | None) -> None:
    """The gateway's cluster engines are seen and handled through its Ray worker process (gateway/cluster_link.py),
    never with Ray in this process; with `address` (--cluster) the worker joins that cluster now (bounded;
    cluster.Unreachable, a UsageError, when it cannot)."""
    from sage_llm.engine import inspect as engine_inspect

    engine_inspect.cluster_attach = cluster_link.attach
    if address:
        LINK.call("join", address=address)


def drop_cluster_link() -> None:
    from sage_llm.engine import inspect as engine_inspect

    engine_inspect.cluster_attach = None
    LINK.close()


def forget_lost(name: str) -> None:
    """A cluster engine whose node stopped answering: its agent is killed without waiting for an answer and its
    record removed at once (a stop would wait out the agent's timeouts), so that the replica's replacement can take
    its name; what is left on the node is stopped by the next agent started there."""
    with contextlib.suppress(SageLLMError):
        LINK.call("abandon", name=name)


def quantization_methods() -> tuple[str, ...]:
    """The `--quantization` values vLLM takes (what POST /api/local-engine/start accepts)."""
    from sage_llm.engine.vllm import QUANTIZATION_METHODS

    return tuple(QUANTIZATION_METHODS)


def human_uptime(seconds: float | None) -> str | None:
    from sage_llm.engine.view import human_uptime as human

    return human(seconds)  # type: ignore[no-any-return]


def port_free(port: int) -> bool:
    """Can an engine listen on 127.0.0.1:`port` now?"""
    from sage_llm.engine import process

    return bool(process.port_is_free("127.0.0.1", port))


def log_file(name: str) -> Path | None:
    from sage_llm.core.state import EngineRecord, StateStore

    rec = StateStore().load(name)
    return Path(rec.log_file) if isinstance(rec, EngineRecord) and rec.log_file else None


# ------------------------------------------------------------------------------------------------------ effects
class EngineEffects:
    """The state machine's effects (machine.Effects) on real engines: blocking library calls run in threads."""

    def __init__(self, opts: Any) -> None:
        self.opts = opts
        self.session: Any = None  # aiohttp.ClientSession, set by the server
        self.cpu: bool | None = None
        self._starting: dict[str, str] = {}  # model -> key variable of the start in progress
        self._seen: dict[str, tuple[Path, Any]] = {}  # engine name -> (record path, its stat when last read)

    def inspect(self, exclude_ports: set[int] | None, with_gpu: bool, external: bool
                ) -> tuple[list[Engine], list[Any]]:
        return inspect(exclude_ports, with_gpu, external)

    async def start(self, key: str, profile: Any, port: int | None, on_progress: Any, near: str | None = None
                    ) -> Engine:
        import asyncio

        from sage_llm.core.errors import UsageError
        from sage_llm.engine.placement import InsufficientGpuMemory
        from sage_llm.gateway.machine import BadInput, LoadFailed, NoRoom

        loop = asyncio.get_running_loop()
        var = self._starting[key] = new_key_var()

        def hop(info: dict[str, Any]) -> None:  # worker thread -> the loop
            loop.call_soon_threadsafe(on_progress, info)

        def said(exc: SageLLMError) -> str:
            return exc.message + (f" (hint: {exc.hint})" if exc.hint else "")

        try:
            if self.opts.cluster:
                from sage_llm.engine.cluster import NotPlaced, Unreachable

                try:
                    return await asyncio.to_thread(start_on_cluster, profile, self.opts, self.opts.load_timeout, hop,
                                                   var, near)
                except NotPlaced as exc:
                    raise NoRoom(said(exc), nodes=frozenset(exc.nodes)) from None
                except Unreachable as exc:  # the head is down or restarting: 503, not the client's mistake
                    raise LoadFailed(said(exc)) from None
            return await asyncio.to_thread(start, profile, self.opts.engine_port, self.opts.load_timeout, hop,
                                           self.opts.sleep, port, var)
        except (InsufficientGpuMemory, NotEnoughMemory) as exc:
            raise NoRoom(said(exc)) from None
        except UsageError as exc:
            raise BadInput(said(exc)) from None
        except SageLLMError as exc:
            raise LoadFailed(said(exc)) from None
        finally:
            if self._starting.get(key) == var:
                del self._starting[key]

    async def cancel_start(self, key: str) -> None:
        """Stop what the start of `key` launched (found by its key variable; it is recorded within moments of the
        launch). Should it come up after all, the machine stops the engine the start returns."""
        import asyncio

        var = self._starting.get(key)
        if var is None:
            return

        def find_and_stop() -> None:
            from sage_llm.core.state import EngineRecord, StateStore

            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and self._starting.get(key) == var:
                names = [r.name for r in StateStore().all() if isinstance(r, EngineRecord) and start_token(r) == var]
                if names:
                    for n in names:
                        stop(n)
                    return
                time.sleep(0.05)

        await asyncio.to_thread(find_and_stop)

    async def stop(self, engine: Engine) -> str:
        import asyncio

        return await asyncio.to_thread(stop, engine.name)

    async def sweep(self, engine: Engine) -> None:
        import asyncio

        if engine.managed and engine.node_id is not None and engine.node_id in suspects():
            await asyncio.to_thread(forget_lost, engine.name)  # its node is going down: nothing there answers
        elif engine.managed:
            with contextlib.suppress(SageLLMError):
                await asyncio.to_thread(stop, engine.name)

    async def sleep(self, engine: Engine) -> bool:
        import asyncio

        if self.cpu is not False or engine.node or not await asyncio.to_thread(host_ram_holds, engine.model):
            return False  # no sleep mode (CPU build), or host RAM cannot hold the weights: stop it instead
        try:
            return await sleep(self.session, engine, level=1)
        except Exception:
            return False

    async def wake(self, engine: Engine) -> bool:
        try:
            return await wake(self.session, engine)
        except Exception:
            return False

    async def alive(self, engine: Engine) -> str:
        import asyncio

        return await asyncio.to_thread(alive_state, engine)

    def present(self, engine: Engine) -> bool:
        """Before a request is routed to a managed engine: does its record still say it runs? One stat() when
        nothing changed; a stop from outside (`sage-llm stop`) marks the record "stopping", then removes it."""
        from sage_llm.core.state import EngineRecord, StateStore

        path, seen = self._seen.get(engine.name, (None, None))
        if path is None:
            path = StateStore().path_for(engine.name)
        try:
            st = os.stat(path)
        except OSError:
            self._seen.pop(engine.name, None)
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == seen:
            return True
        rec = StateStore().load(engine.name)
        ok = isinstance(rec, EngineRecord) and rec.state != "stopping"
        if ok:
            self._seen[engine.name] = (path, stamp)
        return ok


# ------------------------------------------------------------------------------------------------------ sleep mode
SLEEP_ENV = "VLLM_SERVER_DEV_MODE"


async def sleep(session: Any, engine: Engine, level: int = 1, timeout: float = 60.0) -> bool:
    """Put an idle engine to sleep (vLLM dev endpoint, loopback only, with its key); confirmed by /is_sleeping."""
    headers = {"Authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}
    async with session.post(f"{engine.base_url}/sleep", params={"level": str(level)}, headers=headers,
                            timeout=_timeout(timeout)) as r:
        if r.status != 200:
            return False
    return await is_sleeping(session, engine) is True


async def wake(session: Any, engine: Engine, timeout: float = 120.0) -> bool:
    headers = {"Authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}
    async with session.post(f"{engine.base_url}/wake_up", headers=headers, timeout=_timeout(timeout)) as r:
        if r.status != 200:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await is_sleeping(session, engine) is False:
            return True
        import asyncio

        await asyncio.sleep(0.05)
    return False


async def is_sleeping(session: Any, engine: Engine) -> bool | None:
    headers = {"Authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}
    try:
        async with session.get(f"{engine.base_url}/is_sleeping", headers=headers, timeout=_timeout(5)) as r:
            if r.status != 200:
                return None
            data = await r.json(content_type=None)
            return bool(data.get("is_sleeping"))
    except Exception:
        return None


def _timeout(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)
