"""The Python API of sage-llm: the one way to launch, stop and inspect vLLM engines.

Everything the `sage-llm` commands do to engines goes through here, and so does the gateway; SAGE Studio's backend
can call it in-process instead of forking `sage-llm status --json`:

    from sage_llm import api

    doc = api.status()                                   # the `status --json` document (schema_version 1)
    if not doc["local_engine"]["running"]:
        result = api.start(api.LaunchRequest(model="Qwen/Qwen2.5-1.5B-Instruct", port=8001))
        print(result.record.base_url)                    # http://127.0.0.1:8001/v1
    api.stop(8001)                                       # NAME or PORT (str or int)

Rules every function follows:
  * settings are resolved once, in `resolve_launch`: explicit value > environment > ./.env > config file > default;
  * bad input raises `UsageError` (the CLI's exit 2) before anything is changed; operational failures raise other
    `SageLLMError`s (`EngineFailed` carries the diagnosis and the log tail); nothing here prints;
  * nothing here imports Typer or Rich, and `status()` imports neither httpx, psutil nor pynvml until it needs them.

Reference: docs/api.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine.manager import StartResult, StopOutcome
    from sage_llm.engine.switch import SwitchResult
    from sage_llm.engine.view import EngineView
    from sage_llm.engine.vllm import LaunchSpec
    from sage_llm.models.hf_cache import LocalModel, Preflight

__all__ = [
    "LaunchOverrides",
    "LaunchRequest",
    "LocalEngineStatus",
    "ProgressFn",
    "ResolvedLaunch",
    "StatusDocument",
    "engines",
    "explain_exit",
    "find_foreground_engine",
    "models",
    "not_ready",
    "preflight",
    "resolve",
    "resolve_launch",
    "resolve_many",
    "restart",
    "start",
    "status",
    "stop",
    "stop_grace",
    "switch",
]

ProgressFn = Callable[[dict[str, Any]], None]
"""Called about four times a second while an engine loads, with its stage, progress and last log line."""


# ------------------------------------------------------------------------------------------------ requests
@dataclass
class LaunchOptions:
    """The vLLM launch options `start`, `run`, `restart` and `switch` share (one declaration: cli/_launch.py).

    None means "not given": `start` then takes the setting or vLLM's default, `restart`/`switch` keep the recorded
    value. `extra_args` are passed to `vllm serve` verbatim (after `--` on the command line)."""

    host: str | None = None
    port: int | None = None
    gpu_memory_utilization: float | None = None
    quantization: str | None = None
    max_model_len: str | None = None
    served_model_name: str | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    data_parallel_size: int | None = None
    dtype: str | None = None
    enforce_eager: bool | None = None
    download_dir: str | None = None
    trust_remote_code: bool | None = None
    api_key_env: str | None = None  # NAME of the variable holding the key, never the key
    ray_address: str | None = None  # vLLM's own ranks on an existing Ray cluster; "" drops it on restart
    extra_args: list[str] | None = None


@dataclass
class LaunchRequest(LaunchOptions):
    """What to start. Every None is filled by `resolve_launch` from the settings."""

    model: str | None = None  # Hugging Face repo id or local path; None: the default_model setting
    name: str | None = None  # engine name; None: derived from the model
    gpus: str | None = None  # "0,1" or UUIDs; None: the GPUs with the most free memory
    skip_checks: bool = False  # start even if the GPUs lack free memory
    timeout: float | None = None  # seconds to wait until it serves; None: the start_timeout setting
    wait: bool = True  # wait until it serves (False: return once spawned)
    # variables only the engine's environment gets, never this process's: e.g. the value of `api_key_env` that a
    # program holds in memory (the gateway's per-engine keys); None removes an inherited variable. Never recorded,
    # never printed.
    engine_env: dict[str, str | None] = field(default_factory=dict, repr=False)
    cluster: str | None = None  # HOST:PORT of a Ray head: place the whole engine on a node of that cluster
    node: str | None = None  # with `cluster`: the node (id, address, hostname or a custom resource of its own)


@dataclass
class LaunchOverrides(LaunchOptions):
    """What `restart`/`switch` change; everything left None keeps the engine's recorded value."""

    model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        given: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "extra_args":
                continue
            given[f.name] = value
        if self.extra_args:
            given["extra_args"] = list(self.extra_args)
        if given.get("ray_address") == "":
            given["ray_address"] = None
        return given


@dataclass
class ResolvedLaunch:
    """A LaunchRequest with every setting filled in and checked: what `start` will run."""

    spec: LaunchSpec
    name: str | None
    port_explicit: bool  # the port was given explicitly (busy: error) rather than a default (busy: next free one)
    gpus: str | None
    skip_checks: bool
    timeout: float
    wait: bool
    engine_env: dict[str, str | None] = field(default_factory=dict, repr=False)
    cluster: str | None = None
    node: str | None = None


class LocalEngineStatus(TypedDict):
    """The seed's LocalEngineStatus: the ready engine Studio should use (the one on the local port first)."""

    running: bool
    port: int | None
    model: str | None
    pid: int | None
    gpu_memory_usage: float | None  # GB
    uptime: str | None


class StatusDocument(TypedDict):
    """`status --json` (docs/status-json.md; JSON Schema: sage_llm/data/status.schema.json)."""

    schema_version: int
    engines: list[dict[str, Any]]
    local_engine: LocalEngineStatus
    gpus: list[dict[str, Any]]
    gpu_error: str | None


# ------------------------------------------------------------------------------------------------ argument types
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "None": (type(None),), "list[str]": (list,), "dict[str, str | None]": (dict,)}
_LENIENT = {"max_model_len": (str, int)}  # "4k", "auto" or a number of tokens


def _usage(message: str, hint: str | None = None) -> Exception:
    from sage_llm.core.errors import UsageError

    return UsageError(message, hint=hint)


def _check_fields(obj: Any, cls: type) -> None:
    """UsageError unless `obj` is a `cls` whose every field holds one of its declared types (a bool is not an int)."""
    if not isinstance(obj, cls):
        raise _usage(f"expected a {cls.__name__}, not {type(obj).__name__}",
                     hint=f"e.g. api.{cls.__name__}(model=\"Qwen/Qwen2.5-1.5B-Instruct\")")
    for f in fields(cls):
        value = getattr(obj, f.name)
        declared = str(f.type)
        allowed = _LENIENT.get(f.name) or tuple(t for part in _split_union(declared) for t in _TYPES.get(part, ()))
        if not allowed:
            continue
        if value is None and "None" in _split_union(declared):
            continue
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if ok and isinstance(value, list):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise _usage(f"{cls.__name__}.{f.name} must be {declared}, not {type(value).__name__} ({value!r:.60})")


def _split_union(declared: str) -> list[str]:
    return ["dict[str, str | None]"] if declared.startswith("dict[") else [p.strip() for p in declared.split("|")]


def _target(target: Any, what: str = "target") -> str:
    """An engine NAME or PORT as the one string form every command uses; an int is a port."""
    if isinstance(target, int) and not isinstance(target, bool):
        return str(target)
    if not isinstance(target, str):
        raise _usage(f"{what} must be an engine NAME or PORT (str or int), not {type(target).__name__}",
                     hint='e.g. api.stop("qwen") or api.stop(8001)')
    return target


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _usage(f"{what} must be a number of seconds, not {type(value).__name__}")
    return float(value)


def _callback(fn: Any, what: str = "on_progress") -> None:
    if fn is not None and not callable(fn):
        raise _usage(f"{what} must be a function (or None), not {type(fn).__name__}")


# ------------------------------------------------------------------------------------------------ launching
def resolve_launch(request: LaunchRequest) -> ResolvedLaunch:
    """Fill every unset option from the settings (explicit > env > ./.env > config file > default) and validate.

    Raises UsageError for bad input (a wrong type included); nothing is started."""
    from sage_llm.core import settings
    from sage_llm.core.state import validate_name
    from sage_llm.engine import manager
    from sage_llm.engine.vllm import LAUNCH_OPTION_NAMES, MODEL_HINT, LaunchSpec, check_model_name, validate

    _check_fields(request, LaunchRequest)
    # '' is a mistake (an unset shell variable), never "the default model"
    check_model_name(request.model, hint=f"{MODEL_HINT}, or leave MODEL out for the default "
                                         f"({settings.get('default_model')})")
    extra = list(request.extra_args or [])
    model = request.model
    if model is not None and model.startswith("-"):  # `start -- --flag`: no model, only vLLM arguments
        extra.insert(0, model)
        model = None
    given = {name: getattr(request, name) for name in LAUNCH_OPTION_NAMES}  # as asked; the settings fill these:
    given.update(host=settings.get("host", request.host), port=settings.get("local_engine_port", request.port),
                 gpu_memory_utilization=settings.get("gpu_util", request.gpu_memory_utilization),
                 enforce_eager=bool(request.enforce_eager), trust_remote_code=bool(request.trust_remote_code),
                 ray_address=request.ray_address or None)
    spec = LaunchSpec(model=settings.get("default_model", model), extra_args=extra, **given)
    validate(spec, manager.environ_with(request.engine_env))
    if request.host is None:
        _check_dotenv_host(spec.host)
    if request.name is not None:
        validate_name(request.name)
    timeout = _start_timeout(request.timeout)
    cluster = settings.get("cluster", request.cluster) or None
    _check_cluster(cluster, request.node, spec)
    return ResolvedLaunch(spec=spec, name=request.name, port_explicit=request.port is not None, gpus=request.gpus,
                          skip_checks=request.skip_checks, timeout=timeout, wait=request.wait, cluster=cluster,
                          node=request.node, engine_env=dict(request.engine_env))


def _check_cluster(cluster: str | None, node: str | None, spec: LaunchSpec) -> None:
    """--cluster places the whole engine on a node; --ray-address spreads one engine's ranks: never both."""
    from sage_llm.core.errors import UsageError

    if node is not None and not cluster:
        raise UsageError("--node needs --cluster (or $SAGE_LLM_CLUSTER)", hint="e.g. --cluster 10.0.0.1:6379 "
                         "--node 10.0.0.2")
    if node is not None and not node.strip():
        raise UsageError("--node is empty", hint="name a node by id, address, hostname or custom resource")
    if not cluster:
        return
    from sage_llm.engine.cluster import check_address

    check_address(cluster)
    if spec.ray_address:
        raise UsageError("--cluster and --ray-address do not go together: --cluster places whole engines on nodes, "
                         "--ray-address spreads one engine's ranks over the cluster",
                         hint="pick one (docs/distributed.md says which)")


def _check_dotenv_host(host: str) -> None:
    """A ./.env file (a cloned repository's) must not be what exposes an engine beyond this machine: a non-loopback
    bind needs the user's own word (--host, the environment or the config file)."""
    from sage_llm.core import settings
    from sage_llm.core.addresses import is_loopback
    from sage_llm.core.errors import UsageError

    if is_loopback(host):
        return
    source = settings.source_of("SAGE_LOCAL_ENGINE_HOST")
    if source is not None and source[0] == "dotenv":
        raise UsageError(f"SAGE_LOCAL_ENGINE_HOST={host} comes only from {source[1]}: an engine is not exposed to the "
                         "network because a .env file says so; nothing was started",
                         hint=f"pass --host {host} yourself (with --api-key-env VAR), or set it in the environment or "
                              "with `sage-llm config set host`")


def preflight(model: str, download_dir: str | None = None) -> Preflight:
    """The checks on the model before anything is spawned or stopped: is it cached, or how big is the download?

    Offline (HF_HUB_OFFLINE) with no cached copy raises UsageError: vLLM could only fail, after loading a while."""
    from sage_llm.models import hf_cache

    if not isinstance(model, str) or not (download_dir is None or isinstance(download_dir, str)):
        raise _usage("preflight(model, download_dir) takes a model id or path (str) and a directory (str or None)")
    return hf_cache.preflight(model, download_dir)


def start(request: LaunchRequest | ResolvedLaunch, on_progress: ProgressFn | None = None, foreground: bool = False,
          store: StateStore | None = None, checked: Preflight | None = None) -> StartResult:
    """Start an engine (detached, its own session, recorded) and, with `wait`, block until it serves the model.

    Idempotent: the same model already served under the same name/port returns that engine
    (`already_running=True`). `result.preflight` says whether the model was cached. On failure the engine's whole
    process group is stopped, its record is kept as failed and `EngineFailed` carries the diagnosis.
    `checked`: the result of `preflight` for this model when the caller already ran it (it is not run twice).
    `on_progress` raising an exception fails the start with that exception: the engine it spawned is stopped and
    forgotten (KeyboardInterrupt only stops the waiting, as in the CLI)."""
    from sage_llm.engine import manager

    _callback(on_progress)
    launch = request if isinstance(request, ResolvedLaunch) else resolve_launch(request)
    if launch.cluster:
        from sage_llm.core.errors import UsageError
        from sage_llm.engine import cluster

        if foreground:
            raise UsageError("`run` serves in this terminal; engines on a Ray cluster are started with "
                             "`sage-llm start MODEL --cluster ADDRESS`", hint="unset SAGE_LLM_CLUSTER for `run`")

        # the model is read on the node: this machine's cache says nothing about it
        return cluster.start(launch.spec, launch.cluster, node=launch.node, name=launch.name, wait=launch.wait,
                             timeout=launch.timeout, store=store, on_progress=on_progress)
    if checked is None:
        checked = preflight(launch.spec.model, launch.spec.download_dir)
    result = manager.start(launch.spec, name=launch.name, port_explicit=launch.port_explicit, wait=launch.wait,
                           timeout=launch.timeout, on_progress=on_progress, gpus=launch.gpus,
                           skip_checks=launch.skip_checks, foreground=foreground, store=store,
                           engine_env=launch.engine_env or None)
    result.preflight = checked
    return result


def find_foreground_engine(owner_pid: int, store: StateStore | None = None) -> EngineRecord | None:
    """The engine a `run` process (`owner_pid`) launched, when the launch itself did not return (interrupted)."""
    from sage_llm.core.state import EngineRecord, StateStore

    store = store or StateStore()
    for rec in store.all():
        if isinstance(rec, EngineRecord) and rec.foreground and rec.owner_pid == owner_pid:
            return rec
    return None


def explain_exit(record: EngineRecord) -> str | None:
    """Why an engine exited, from its log (the words `start` uses), or None when the log does not say."""
    from sage_llm.observe.diagnose import diagnose
    from sage_llm.observe.logs import run_lines

    d = diagnose(run_lines(record.log_file), {"port": record.port, "model": record.model, "name": record.name})
    if d is None:
        return None
    return f"{d.message} (hint: {d.hint})" if d.hint else d.message


# ------------------------------------------------------------------------------------------------ stopping
def stop_grace(timeout: float | None = None) -> float:
    """Seconds `stop` waits between SIGTERM and SIGKILL: `timeout` if given, else the stop_timeout setting."""
    from sage_llm.core import settings
    from sage_llm.engine.manager import check_stop_timeout

    value = float(settings.get("stop_timeout", timeout))
    check_stop_timeout(value)
    return value


def stop(target: str | int, timeout: float | None = None, force: bool = False,
         on_escalate: Callable[[str], None] | None = None, store: StateStore | None = None) -> StopOutcome:
    """Stop one engine (NAME, or PORT as a str or an int) and everything it spawned; its record goes once nothing of
    it is left.

    `timeout`: seconds between SIGTERM and SIGKILL (None: the stop_timeout setting). An engine this tool did not
    start is never signalled (UsageError)."""
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import manager

    _callback(on_escalate, "on_escalate")
    grace = stop_grace(_number(timeout, "timeout"))
    store = store or StateStore()
    name = resolve(target, store)
    rec = store.load(name)
    if isinstance(rec, EngineRecord) and rec.cluster:  # local or cluster is chosen here, as in `start`
        from sage_llm.engine import cluster

        return cluster.stop(rec, grace, bool(force), store)
    return manager.stop(name, timeout=grace, force=bool(force), store=store, on_escalate=on_escalate)


def resolve(target: str | int, store: StateStore | None = None) -> str:
    """The recorded engine NAME for a NAME or PORT (the one rule every command uses). Raises EngineNotFound, or
    UsageError for a malformed name, a wrong type or a port held by an engine this tool did not start."""
    from sage_llm.core.state import StateStore
    from sage_llm.engine import targets

    return targets.resolve_one(_target(target), store or StateStore())


def resolve_many(targets_: list[str | int], all_: bool = False, store: StateStore | None = None) -> list[str]:
    """Engine names for several NAME|PORT arguments, or every recorded engine with `all_`."""
    from sage_llm.core.state import StateStore
    from sage_llm.engine import targets

    if isinstance(targets_, (str, int)) or not isinstance(targets_, (list, tuple)):
        raise _usage(f"targets must be a list of engine NAMEs or PORTs, not {type(targets_).__name__}",
                     hint='e.g. api.resolve_many(["qwen", 8001])')
    return targets.resolve_targets([_target(t) for t in targets_], all_, store or StateStore())


# ------------------------------------------------------------------------------------------- restart, switch
def restart(name: str, overrides: LaunchOverrides | None = None, gpus: str | None = None,
            timeout: float | None = None, stop_timeout: float | None = None, on_progress: ProgressFn | None = None,
            store: StateStore | None = None) -> SwitchResult:
    """Stop the engine and start it again with its recorded settings plus `overrides`.

    Every check `start` makes (options, engine install, the model's cache when offline) runs before the engine is
    stopped. Timeouts default to the same settings as `start` and `stop`."""
    from sage_llm.engine import switch as switching
    from sage_llm.engine.vllm import check_model_name

    name = _target(name, "name")
    if overrides is not None:
        _check_fields(overrides, LaunchOverrides)
    _callback(on_progress)
    timeout, stop_timeout = _number(timeout, "timeout"), _number(stop_timeout, "stop_timeout")
    check_model_name(overrides.model if overrides else None, "--model")
    start_timeout = _start_timeout(timeout)
    return switching.restart(name, (overrides or LaunchOverrides()).as_dict(), gpus=gpus, timeout=start_timeout,
                             stop_timeout=stop_grace(stop_timeout), store=store, on_progress=on_progress)


def switch(name: str, model: str, rolling: bool = False, overrides: LaunchOverrides | None = None,
           gpus: str | None = None, timeout: float | None = None, stop_timeout: float | None = None,
           on_progress: ProgressFn | None = None, store: StateStore | None = None) -> SwitchResult:
    """Serve `model` under the engine's name, every other recorded setting kept unless overridden.

    Without `rolling` it is a restart with the new model; with `rolling` the new engine starts beside the old one and
    takes over the name once it serves. Either way every pre-flight of `start` runs before anything is stopped."""
    from sage_llm.engine import switch as switching
    from sage_llm.engine.vllm import check_model_name

    name = _target(name, "name")
    if not isinstance(model, str):
        raise _usage(f"model must be a str (a Hugging Face id or a path), not {type(model).__name__}")
    if overrides is not None:
        _check_fields(overrides, LaunchOverrides)
    _callback(on_progress)
    timeout, stop_timeout = _number(timeout, "timeout"), _number(stop_timeout, "stop_timeout")
    check_model_name(model)  # before the engine is even looked up: '' is bad input, whatever NAME is
    return switching.switch(name, model, rolling=rolling, overrides=(overrides or LaunchOverrides()).as_dict(),
                            gpus=gpus, timeout=_start_timeout(timeout), stop_timeout=stop_grace(stop_timeout),
                            store=store, on_progress=on_progress)


def _start_timeout(timeout: float | None) -> float:
    """Seconds `start` waits until the engine serves: `timeout` if given, else the start_timeout setting; checked."""
    from sage_llm.core import settings
    from sage_llm.engine.manager import check_start_timeout

    value = float(settings.get("start_timeout", timeout))
    check_start_timeout(value)
    return value


# ------------------------------------------------------------------------------------------------ inspecting
def status(target: str | int | None = None, with_gpu: bool = True, store: StateStore | None = None
           ) -> StatusDocument:
    """The `status --json` document: every engine (managed and external), the local engine for Studio, the GPUs.

    With `target` (NAME or PORT) `engines` holds that engine only (empty when unknown)."""
    from sage_llm.engine import status as status_doc

    target = None if target is None else _target(target)
    doc, _views, _warnings = status_doc.build(target, store=store, with_gpu=with_gpu)
    return doc  # type: ignore[return-value]


def engines(store: StateStore | None = None, include_external: bool = True) -> list[EngineView]:
    """Every engine with its live state (probed now), as typed views; no GPU figures (see `status`)."""
    from sage_llm.engine import inspect as inspecting
    from sage_llm.engine.status import local_port

    views, _warnings = inspecting.inspect(store, include_external=include_external, local_port=local_port())
    return views


def not_ready(engines_: list[dict[str, Any]] | list[EngineView]) -> bool:
    """The rule behind `status NAME` exiting 3: the engine is unknown (nothing matched) or not ready."""
    if not engines_:
        return True
    first = engines_[0]
    state = first.get("state") if isinstance(first, dict) else first.state
    return state != "ready"


def models(extra_dirs: list[str] | None = None) -> list[LocalModel]:
    """The models in the local Hugging Face cache (and `extra_dirs`), with size, revision and completeness."""
    from sage_llm.models import hf_cache

    if extra_dirs is not None and (isinstance(extra_dirs, str) or not all(isinstance(d, str) for d in extra_dirs)):
        raise _usage("extra_dirs must be a list of directory paths (str)", hint='e.g. api.models(["/data/models"])')
    return hf_cache.list_models(extra_dirs)
