"""Whole engines on the nodes of a Ray cluster (`start --cluster ADDRESS [--node NODE]`): placement, records, stop.

Distinct from `--ray-address` (engine/ray_cluster.py), which hands one engine's tensor/pipeline ranks to Ray. Here
each engine is one process group on one node, started and stopped there by its agent (engine/cluster_agent.py): a
detached, named Ray actor that asks Ray for the engine's GPUs, so Ray's scheduler picks the node and never places two
engines on the same GPUs. The engine's record is an ordinary record with a `cluster` entry (address, node, agent).

Ray is an optional extra (`pip install 'sage-llm[ray]'`); it is imported only here, and only when a cluster engine
is started, stopped or recorded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_llm.core.errors import EngineFailed, SageLLMError, UsageError
from sage_llm.core.records import asdict
from sage_llm.engine.cluster_agent import ACTOR_PREFIX, NAMESPACE

if TYPE_CHECKING:
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine.manager import StartResult, StopOutcome
    from sage_llm.engine.view import EngineView
    from sage_llm.engine.vllm import LaunchSpec

CONNECT_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = float(os.environ.get("SAGE_LLM_CLUSTER_JOIN_TIMEOUT", "30"))
INSTALL_HINT = "pip install 'sage-llm[ray]' (Ray 2.60.0, the version of the cluster)"


# ------------------------------------------------------------------------------------------------- connecting
class Unreachable(UsageError):
    """The cluster does not answer or does not let this process join: a usage error for the CLI (exit 2), a
    passing fault for a long-lived caller such as the gateway (503, try again), not bad input."""


def ray_module() -> Any:
    """Ray, or a UsageError saying what to install."""
    try:
        import ray
    except ImportError:
        raise UsageError("--cluster needs Ray, which is not installed", hint=INSTALL_HINT) from None
    return ray


def check_address(address: str) -> tuple[str, int]:
    """HOST:PORT of the cluster's head (GCS), or UsageError."""
    from sage_llm.engine.vllm import RAY_ADDRESS_RE

    if not address or address == "auto" or address.startswith("ray://") or not RAY_ADDRESS_RE.match(address):
        raise UsageError(f"--cluster {address!r} is not HOST:PORT of a Ray head",
                         hint="e.g. --cluster 10.0.0.1:6379 (the address `ray start --head` printed)")
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


_CONNECTING = threading.Lock()  # a gateway's threads (starts, refresh, liveness) connect at once: one ray.init


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """Connect this process to the cluster (once per address), or UsageError when it does not answer in `timeout`.
    Thread-safe: callers racing to connect share one `ray.init`."""
    with _CONNECTING:
        return _connect(address, timeout)


def _connect(address: str, timeout: float) -> Any:
    from sage_llm.engine.vllm import ray_address_is_loopback

    host, port = check_address(address)
    var = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    if ray_address_is_loopback(address) and "ray" not in sys.modules and var not in os.environ:
        # read once, when Ray is imported: without it Ray rewrites 127.0.0.1 to this machine's other address. Set
        # for the import only, so that engines started later from this process do not inherit it by accident.
        os.environ[var] = "0"
        try:
            ray = ray_module()
        finally:
            os.environ.pop(var, None)
    ray = ray_module()
    if ray.is_initialized() and getattr(connect, "_address", None) == address:
        return ray
    try:  # before leaving a cluster this process is joined to: a wrong address must not cost that connection
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise Unreachable(f"the Ray cluster at {address} is unreachable ({exc.strerror or exc})",
                         hint="check the address and that `ray start --head` runs there") from None
    if ray.is_initialized():
        ray.shutdown()
    _quiet(ray)
    failure: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR",
                     configure_logging=False, include_dashboard=False)
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    # ray.init retries an unanswering GCS for minutes: bound it (the thread is left behind; this process ends soon)
    joiner = threading.Thread(target=join, daemon=True, name="ray-init")
    joiner.start()
    joiner.join(JOIN_TIMEOUT_S)
    if joiner.is_alive():
        raise Unreachable(f"the Ray cluster at {address} accepts connections but did not let this machine join "
                         f"within {JOIN_TIMEOUT_S:g} s", hint="is it a Ray 2.60.0 head, and does it advertise an "
                         "address this machine reaches (`ray start --head --node-ip-address ...`)?")
    if failure:
        raise Unreachable(f"cannot join the Ray cluster at {address}: {str(failure[0]).splitlines()[0][:200]}",
                         hint="the head must run Ray 2.60.0 (`ray --version`) and be reachable from here") from None
    connect._address = address  # type: ignore[attr-defined]
    return ray


def _quiet(ray: Any) -> None:
    """Ray's driver prints the cluster's error messages ("The node ... missed too many heartbeats") to stdout, which
    would break `status --json`; `status` reports dead nodes and agents itself. With SAGE_LLM_DEBUG they go to
    stderr."""
    import logging

    from ray._private import worker

    if not os.environ.get("SAGE_LLM_DEBUG"):  # "SIGTERM handler is not set because current thread is not the main
        logging.getLogger("ray").setLevel(logging.ERROR)  # thread" and the like, in the gateway's log at each join

    def to_stderr(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        if os.environ.get("SAGE_LLM_DEBUG"):
            import sys

            for line in data.get("lines", []):
                print(f"(ray {data.get('pid')}) {line}", file=sys.stderr)

    worker.print_to_stdstream = to_stderr


# -------------------------------------------------------------------------------------------------- placement
def cluster_nodes(ray: Any) -> list[dict[str, Any]]:
    """Every node the cluster knows: id, address, hostname, alive, total and free resources."""
    from ray._private.state import state

    free = state.available_resources_per_node()
    out = []
    for n in ray.nodes():
        out.append({"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"),
                    "hostname": n.get("NodeManagerHostname"), "alive": bool(n.get("Alive")),
                    "resources": dict(n.get("Resources") or {}), "free": dict(free.get(n["NodeID"], {}))})
    return out


def describe_node(n: dict[str, Any]) -> str:
    """`ADDRESS (ID): g/G GPU, c/C CPU free` (free of total, as Ray counts them), or `... : dead`."""
    if not n["alive"]:
        return f"{n['address']} ({n['node_id'][:8]}): dead"
    return (f"{n['address']} ({n['node_id'][:8]}): {n['free'].get('GPU', 0):g}/{n['resources'].get('GPU', 0):g} GPU, "
            f"{n['free'].get('CPU', 0):g}/{n['resources'].get('CPU', 0):g} CPU free")


def _describe_free(nodes: list[dict[str, Any]]) -> str:
    return "; ".join(describe_node(n) for n in nodes if n["alive"]) or "no node is alive"


def nodes_view(address: str, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """The cluster's nodes as Ray sees them (`gateway status`): {"address", "nodes": cluster_nodes()}, or
    {"address", "error"} when the cluster cannot be asked. Bounded: joining and asking together take at most
    `timeout` seconds; a Ray call that hangs past it is left behind in a daemon thread, never waited for."""

    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["nodes"] = cluster_nodes(connect(address, timeout=min(timeout, CONNECT_TIMEOUT_S)))
        except SageLLMError as exc:
            result["error"] = exc.message
        except Exception as exc:  # Ray's own failures (a GCS gone mid-call): reported, not raised
            result["error"] = (str(exc).splitlines() or [type(exc).__name__])[0][:200]

    asker = threading.Thread(target=ask, daemon=True, name="ray-nodes")
    asker.start()
    asker.join(timeout)
    if asker.is_alive() or not result:
        return {"address": address, "error": f"the Ray cluster at {address} did not answer within {timeout:g} s"}
    return {"address": address, **result}


def _custom(n: dict[str, Any]) -> list[str]:
    default = {"CPU", "GPU", "memory", "object_store_memory"}
    return [r for r in n["resources"] if r not in default and not r.startswith("node:") and "_group_" not in r]


def choose_node(nodes: list[dict[str, Any]], node: str | None, gpus: int) -> dict[str, Any] | None:
    """The node named by `node` (node id or its first 8+ characters, address, hostname, `node:<ip>`, or a custom
    resource only that node has), checked for `gpus` GPUs in all; None when Ray may choose. UsageError otherwise."""
    alive = [n for n in nodes if n["alive"]]
    if node is None:
        if gpus and not any(n["resources"].get("GPU", 0) >= gpus for n in alive):
            raise UsageError(f"no node of the cluster has {gpus} GPU(s) (tensor x pipeline parallel size); free: "
                             f"{_describe_free(nodes)}", hint="lower -tp/-pp, or add a node with enough GPUs")
        return None
    key = node.removeprefix("node:")
    found = [n for n in alive if n["node_id"] == key or (len(key) >= 8 and n["node_id"].startswith(key))]
    found = found or [n for n in alive if key in (n["address"], n["hostname"])]
    found = found or [n for n in alive if node in _custom(n)]
    if not found:
        dead = [n for n in nodes if not n["alive"] and (n["node_id"].startswith(key) or key == n["address"])]
        known = ", ".join(f"{n['node_id'][:8]} ({n['address']}{', ' + ','.join(_custom(n)) if _custom(n) else ''})"
                          for n in alive)
        what = "is dead" if dead else "is not a node of the cluster"
        raise UsageError(f"--node {node!r} {what}; nodes: {known or 'none alive'}",
                         hint="name a node by id, address, hostname or a custom resource of its own")
    if len(found) > 1:
        ids = ", ".join(n["node_id"][:12] for n in found)
        raise UsageError(f"--node {node!r} names {len(found)} nodes ({ids})", hint="name one by its node id")
    chosen = found[0]
    if chosen["resources"].get("GPU", 0) < gpus:
        raise UsageError(f"node {node!r} has {chosen['resources'].get('GPU', 0):g} GPU(s), the engine needs {gpus}; "
                         f"free: {_describe_free(nodes)}", hint="choose another --node, or leave --node out")
    return chosen


def preferred_node(nodes: list[dict[str, Any]], gpus: int, spread: dict[str, int], avoid: set[str]) -> str | None:
    """The node (id) a new replica should go to when it has room (the caller asks Ray for it softly; Ray still
    decides whether it fits): among the alive nodes with `gpus` GPUs in all and not in `avoid` (node ids), the one
    holding the fewest engines of the model (`spread`: node id -> count), then the most free GPUs, then free CPUs.
    None when no node is preferable to another (no replica anywhere yet and nothing to avoid): Ray's choice then."""
    cands = [n for n in nodes if n["alive"] and n["resources"].get("GPU", 0) >= gpus and n["node_id"] not in avoid]
    if not cands or (not avoid and not any(spread.values())):
        return None
    best = min(cands, key=lambda n: (spread.get(n["node_id"], 0), -n["free"].get("GPU", 0),
                                     -n["free"].get("CPU", 0), n["node_id"]))
    return str(best["node_id"])


def gpus_for(spec: LaunchSpec, nodes: list[dict[str, Any]]) -> int:
    """GPUs one cluster engine asks Ray for: tensor x pipeline parallel size (data-parallel replicas are vLLM's own
    business on the node); 0 on a cluster without any GPU (CPU engines, placed by CPU nodes alone)."""
    if not any(n["alive"] and n["resources"].get("GPU", 0) > 0 for n in nodes):
        return 0
    from sage_llm.engine.vllm import model_parallel

    return model_parallel(spec)


def actor_name(name: str) -> str:
    return f"{ACTOR_PREFIX}{name}"


def _agent_class(ray: Any) -> Any:
    from sage_llm.engine.cluster_agent import EngineAgent

    return ray.remote(EngineAgent)


def _get_actor(ray: Any, name: str) -> Any | None:
    try:
        return ray.get_actor(actor_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------------ start
class NotPlaced(SageLLMError):
    """No node had the engine's GPUs free within `place_within` seconds (the gateway then makes room). `nodes`: the
    ids of the alive nodes that could hold it once engines there stop (enough GPUs in all)."""

    def __init__(self, message: str, nodes: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.nodes = nodes


def start(spec: LaunchSpec, address: str, node: str | None = None, name: str | None = None, wait: bool = True,
          timeout: float = 900.0, store: StateStore | None = None, on_progress: Any = None,
          owner: str | None = None, prefer: str | None = None, place_within: float | None = None,
          spread: dict[str, int] | None = None, avoid: set[str] | None = None) -> StartResult:
    """Place the engine on a node of the cluster, start it there through its agent, record it, and (with `wait`)
    wait until it serves. Bad input (unknown node, not enough GPUs, unreachable cluster): UsageError, nothing left.

    For the gateway: `owner` marks the record as the gateway's (record.cluster["gateway"]); `prefer` names a node
    (id or address) Ray should use when it has room (soft affinity: another node otherwise); without it, `spread`
    (node id -> engines of the same model there) and `avoid` (ids of nodes suspected dead) choose the
    preferred node (preferred_node). `place_within`: when Ray has placed the agent nowhere after that many seconds,
    it is withdrawn and NotPlaced raised."""
    from sage_llm.core.state import EngineRecord, StateStore, utcnow_iso, validate_name
    from sage_llm.engine.manager import StartResult
    from sage_llm.engine.targets import slug
    from sage_llm.engine.vllm import validate

    store = store or StateStore()
    validate(spec)
    chosen = name or slug(spec.model)
    validate_name(chosen)
    ray = connect(address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = cluster_nodes(ray)
    gpus = gpus_for(spec, nodes)
    target = choose_node(nodes, node, gpus)
    if target is None and prefer is None and (spread or avoid):
        prefer = preferred_node(nodes, gpus, spread or {}, avoid or set())
    soft = None if target is not None or prefer is None else next(
        (n for n in nodes if n["alive"] and prefer in (n["node_id"], n["address"])), None)
    with store.lock():
        if store.load(chosen) is not None:
            raise UsageError(f"engine {chosen!r} is already recorded",
                             hint=f"stop it first (`sage-llm stop {chosen}`) or pick another --name")
        if _get_actor(ray, chosen) is not None:
            raise UsageError(f"the cluster already has an agent named {actor_name(chosen)!r} (another machine's "
                             "engine of that name)", hint="pick another --name")
        engine_id = secrets.token_hex(8)
        record = EngineRecord(
            name=chosen, model=spec.model, served_model_name=spec.served_model_name or spec.model, host=spec.host,
            port=spec.port, id=engine_id, log_file=str(store.log_path(chosen)), started_at=utcnow_iso(),
            state="launching", settings=spec.settings(), api_key_env=spec.api_key_env,
            cluster={"address": address, "node": node, "node_id": target["node_id"] if target else None,
                     "node_ip": target["address"] if target else None, "agent": actor_name(chosen),
                     "namespace": NAMESPACE, "gpus": gpus, "pid": None, "node_log_file": None,
                     **({"gateway": owner} if owner else {})},
        )
        store.save(record)
    options: dict[str, Any] = {"name": actor_name(chosen), "namespace": NAMESPACE, "lifetime": "detached",
                               "num_cpus": 0, "num_gpus": gpus, "max_restarts": 0}
    if target is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(target["node_id"], soft=False)
    elif soft is not None:  # that node while it has room; anywhere Ray finds room otherwise
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(soft["node_id"], soft=True,
                                                                        _spill_on_unavailable=True)
    agent = _agent_class(ray).options(**options).remote(chosen, engine_id, spec_doc(spec))
    t0 = time.time()
    deadline = time.monotonic() + timeout
    where_ref = agent.where.remote()
    if not wait:
        # the agent launches the engine itself once placed; `status` records where (see _view)
        done, _ = ray.wait([where_ref], timeout=2.0)
        if done:
            with contextlib.suppress(Exception):
                _placed(ray.get(where_ref), record, store)
        return StartResult(record)
    # placement: the agent's first call answers once Ray has found it a node with the GPUs free
    while True:
        done, _ = ray.wait([where_ref], timeout=0.25)
        if done:
            break
        if on_progress:
            on_progress({"elapsed_s": time.time() - t0, "log_line": "waiting for Ray to place the engine",
                         "record": record, "stage": "pending", "progress": None, "detail": None,
                         "stage_elapsed_s": time.time() - t0, "snapshot": None})
        if place_within is not None and time.time() - t0 > place_within and not _leased(agent):
            _abandon(ray, agent, record, store)
            alive = [n for n in cluster_nodes(ray) if n["alive"] and n["resources"].get("GPU", 0) >= gpus]
            fits = [n["node_id"] for n in alive if target is None or n["node_id"] == target["node_id"]]
            raise NotPlaced(f"no node of the cluster has {gpus} GPU(s) free for {spec.model} (free: "
                            f"{_describe_free(cluster_nodes(ray))})", fits,
                            hint="stop an engine of the cluster, or add a node")
        if time.monotonic() > deadline:
            _abandon(ray, agent, record, store)
            raise EngineFailed(f"engine {chosen!r} was not placed within {timeout:g} s: no node has {gpus} GPU(s) "
                               f"free (free: {_describe_free(cluster_nodes(ray))})",
                               hint="stop an engine of the cluster, or pass --node / a longer --timeout")
    try:
        where = ray.get(where_ref)
    except Exception as exc:
        _abandon(ray, agent, record, store)
        raise EngineFailed(f"engine {chosen!r}: its agent failed on the node: {str(exc).splitlines()[-1][:200]}",
                           hint="the node needs sage-llm (and Ray 2.60.0) installed") from None
    if where.get("launch_error"):
        _abandon(ray, agent, record, store)
        said = where["launch_error"]
        raise EngineFailed(f"engine {chosen!r} could not be started on {where['node_ip']}: {said}",
                           hint=None if "(hint: " in said else "check the node's vLLM (`sage-llm doctor` there)")
    _record_launch(record, where, where["launched"], store)
    result = StartResult(record)
    if wait:
        result.ready_after_s = _wait_ready(ray, agent, record, store, deadline, t0, on_progress)
    return result


def _leased(agent: Any) -> bool:
    """Has Ray given the agent a worker on some node (its resources are held; it is being created), rather than
    still waiting for a node with the resources free? The GCS actor table has its worker's pid from the lease on
    (0 before): under load a worker takes seconds to start, which is not "no room"."""
    from ray._private.state import actors

    try:
        entry = actors(actor_id=agent._actor_id.hex())
    except Exception:
        return True  # cannot tell: keep waiting rather than make room for nothing
    return bool((entry or {}).get("Pid"))


def bind_host(host: str, node_ip: str) -> str:
    """Where a cluster engine listens: the node's address when the setting is loopback (the default), so that its
    base_url is reachable from the other nodes; an explicit non-loopback --host as given."""
    from sage_llm.core.addresses import is_loopback

    return node_ip if is_loopback(host) and node_ip else host


def _placed(where: dict[str, Any], record: EngineRecord, store: StateStore) -> None:
    """Record where a --no-wait engine was placed, once its agent says so (at most once: state `launching` only)."""
    if not where.get("launched"):
        if where.get("launch_error"):
            with store.lock():
                current = store.load(record.name)
                if getattr(current, "id", None) == record.id and current.state == "launching":  # type: ignore
                    current.state, current.error = "failed", where["launch_error"]  # type: ignore[union-attr]
                    store.save(current)  # type: ignore[arg-type]
        return
    current = store.load(record.name)
    if getattr(current, "id", None) == record.id and current.state == "launching":  # type: ignore[union-attr]
        _record_launch(current, where, where["launched"], store)  # type: ignore[arg-type]
        record.__dict__.update(current.__dict__)  # type: ignore[union-attr]


def spec_doc(spec: LaunchSpec) -> dict[str, Any]:
    """The spec as JSON (sent to the agent, and to the gateway's Ray worker)."""
    doc = asdict(spec)
    doc["extra_args"] = list(spec.extra_args)
    return doc


def _record_launch(record: EngineRecord, where: dict[str, Any], launched: dict[str, Any], store: StateStore
                   ) -> None:
    with store.lock():
        record.host, record.port = launched["host"], launched["port"]
        record.argv, record.env = launched["argv"], launched["env"]
        record.cluster = {**(record.cluster or {}), "node_id": where["node_id"], "node_ip": where["node_ip"],
                          "hostname": where.get("hostname"), "agent_pid": where["pid"], "pid": launched["pid"],
                          "node_log_file": launched["log_file"], "tmp_dir": launched["tmp_dir"]}
        record.settings = {**record.settings, "host": launched["host"], "port": launched["port"]}
        record.state = "running"
        store.save(record)


def _wait_ready(ray: Any, agent: Any, record: EngineRecord, store: StateStore, deadline: float, t0: float,
                on_progress: Any) -> float:
    from sage_llm.observe.progress import StageParser

    while True:
        st = ray.get(agent.poll.remote(), timeout=CALL_TIMEOUT_S)
        if st["ready"]:
            return time.time() - t0
        if not st["alive"]:
            _failed(ray, agent, record, store, "exited during startup", st["lines"])
        if time.monotonic() > deadline:
            _failed(ray, agent, record, store, "was not ready in time (--timeout)", st["lines"])
        if on_progress:
            parser = StageParser()
            for line in st["lines"]:
                parser.feed_line(line)
            snap = parser.snap
            on_progress({"elapsed_s": time.time() - t0, "log_line": st["lines"][-1] if st["lines"] else "",
                         "record": record, "stage": snap.stage, "progress": snap.progress, "detail": snap.detail,
                         "stage_elapsed_s": None, "snapshot": None})
        time.sleep(0.25)


def _failed(ray: Any, agent: Any, record: EngineRecord, store: StateStore, what: str, lines: list[str]) -> None:
    from sage_llm.observe.diagnose import diagnose

    diag = diagnose(lines, {"port": record.port, "model": record.model, "name": record.name})
    with contextlib.suppress(Exception):
        ray.get(agent.stop.remote(5.0), timeout=60)
    with contextlib.suppress(Exception):
        ray.kill(agent)
    reason = f"engine {record.name!r} {what}" + (f": {diag.message}" if diag else "")
    hint = diag.hint if diag and diag.hint else f"see `sage-llm logs {record.name} -n 80`"
    with store.lock():
        record.state, record.error = "failed", f"{reason} (hint: {hint})"
        store.save(record)
    err = EngineFailed(reason, hint=hint)
    err.log_tail = lines[-20:]  # type: ignore[attr-defined]
    err.diagnosis = diag  # type: ignore[attr-defined]
    raise err


def _abandon(ray: Any, agent: Any, record: EngineRecord, store: StateStore) -> None:
    """A start that never got its engine going: the agent goes, and so does the record (nothing left behind)."""
    ready, _ = ray.wait([agent.where.remote()], timeout=1.0)
    if ready:  # placed: it may have launched something
        with contextlib.suppress(Exception):
            ray.get(agent.stop.remote(5.0), timeout=30)
    with contextlib.suppress(Exception):
        ray.kill(agent)
    store.forget(record.name, record.id)


# ------------------------------------------------------------------------------------------------------- stop
def stop(rec: EngineRecord, grace: float, force: bool, store: StateStore) -> StopOutcome:
    """Stop a cluster engine through its agent (or, when the agent is gone, through a sweep task on its node); the
    record goes once nothing of it is left."""
    from sage_llm.engine.manager import StopOutcome

    info = rec.cluster or {}
    started = time.monotonic()
    try:
        ray = connect(info["address"])
    except UsageError as exc:
        if not force:
            raise SageLLMError(f"engine {rec.name!r}: {exc.message}; nothing was stopped",
                               hint=f"`sage-llm stop {rec.name} --force` forgets the record") from None
        with store.lock():
            store.remove(rec.name)
        return StopOutcome(rec.name, stopped=False, message=f"forgot {rec.name!r} ({exc.message}); its engine may "
                           "still run on its node: the next agent started there stops it")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    outcome = StopOutcome(rec.name, stopped=True)
    agent = _get_actor(ray, rec.name)
    node = next((n for n in cluster_nodes(ray) if n["node_id"] == info.get("node_id")), None)
    result: dict[str, Any] | None = None
    if agent is not None and not ray.wait([agent.where.remote()], timeout=2.0)[0]:
        # never placed (waiting for GPUs): nothing of it runs anywhere
        ray.kill(agent)
        result = {"stopped": True, "survivors": [], "escalated": False, "shm_removed": []}
        outcome.already_gone = True
        agent = None
    if agent is not None:
        try:
            result = ray.get(agent.stop.remote(0.0 if force else grace), timeout=grace + 60)
        except Exception as exc:
            outcome.notes.append(f"agent did not answer ({str(exc).splitlines()[-1][:120]})")
    if result is None and node is not None and node["alive"]:
        from sage_llm.engine import cluster_agent

        task = ray.remote(num_cpus=0)(cluster_agent.sweep).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["node_id"], soft=False))
        done = ray.get(task.remote(rec.id, 0.0 if force else grace), timeout=grace + 60)
        if done:
            result = done[0]
            outcome.already_gone = not done[0]["was_alive"]
            if done[0]["was_alive"]:
                outcome.notes.append("its agent was gone; the orphaned engine was stopped on its node")
        else:
            result = {"stopped": True, "survivors": [], "escalated": False, "shm_removed": []}
            outcome.already_gone = True
    elif result is None:
        outcome.already_gone = True
        outcome.notes.append(f"node {info.get('node_ip')} is dead; whatever is left of the engine there is stopped by "
                             "the next agent started on that node")
        result = {"stopped": True, "survivors": [], "escalated": False, "shm_removed": []}
    outcome.stopped = bool(result["stopped"])
    outcome.survivors = [tuple(s) for s in result.get("survivors", [])]  # type: ignore[misc]
    outcome.escalated = bool(result.get("escalated"))
    outcome.shm_removed = list(result.get("shm_removed", []))
    outcome.duration_s = time.monotonic() - started
    if not outcome.stopped:
        left = ", ".join(f"{n} (pid {p})" for p, n in outcome.survivors)
        outcome.message = f"engine {rec.name!r}: still running on {info.get('node_ip')} after SIGKILL: {left}"
        return outcome
    if agent is not None:
        with contextlib.suppress(Exception):
            ray.kill(agent)
    store.forget(rec.name, rec.id)
    where = f" on {info.get('node_ip')}"
    how = " (SIGKILL after the grace period)" if outcome.escalated else (" (forced)" if force else "")
    outcome.message = (f"engine {rec.name!r} was not running; record removed" if outcome.already_gone
                       else f"stopped {rec.name!r}{where}{how} in {outcome.duration_s:.2f} s")
    return outcome


def abandon_record(rec: EngineRecord, store: StateStore) -> None:
    """Give up on a cluster engine whose node is lost: kill its agent (Ray does it asynchronously; no answer is
    awaited) and forget its record. Whatever of the engine is left on the node is stopped by the next agent started
    there (`sweep`). Bounded: the join is the only wait."""
    with contextlib.suppress(Exception):
        ray = connect((rec.cluster or {})["address"])
        agent = _get_actor(ray, rec.name)
        if agent is not None:
            ray.kill(agent)
    store.forget(rec.name, rec.id)


# ----------------------------------------------------------------------------------------------------- status
def attach(views: list[EngineView], store: StateStore, timeout: float = 4.0) -> None:
    """Live state of every cluster engine's view, from its agent (bounded; a cluster that does not answer makes the
    view `unhealthy` with the reason)."""
    by_address: dict[str, list[EngineView]] = {}
    for v in views:
        if v.record is not None and v.record.cluster:
            by_address.setdefault(v.record.cluster["address"], []).append(v)
    for address, group in by_address.items():
        try:
            ray = connect(address, timeout=min(timeout, CONNECT_TIMEOUT_S))
            nodes = {n["node_id"]: n for n in cluster_nodes(ray)}
        except (SageLLMError, Exception) as exc:
            msg = exc.message if isinstance(exc, SageLLMError) else str(exc).splitlines()[0][:200]
            for v in group:
                v.state, v.error = "unhealthy", f"cannot ask the cluster: {msg}"
            continue
        for v in group:
            _view(ray, v, nodes, timeout, store)


def _view(ray: Any, v: EngineView, nodes: dict[str, dict[str, Any]], timeout: float, store: StateStore) -> None:
    from sage_llm.engine import cluster_agent

    rec = v.record
    assert rec is not None
    assert rec.cluster is not None
    info = rec.cluster
    node = nodes.get(info.get("node_id") or "")
    v.cluster = {"address": info["address"], "node_id": info.get("node_id"), "node_address": info.get("node_ip"),
                 "agent": info.get("agent"), "gpus": info.get("gpus"), "node_alive": node["alive"] if node else None}
    v.pid = info.get("pid")
    if node is not None and not node["alive"]:
        v.state, v.error = "failed", (f"node {info.get('node_ip')} ({info.get('node_id', '')[:8]}) is dead; "
                                      f"`sage-llm stop {rec.name}` removes the record")
        return
    if rec.state == "failed":
        v.state, v.error = "failed", rec.error or "engine failed"
        return
    agent = _get_actor(ray, rec.name)
    if agent is None and rec.state == "launching" and _age_s(rec) < CALL_TIMEOUT_S:
        v.state, v.stage = "starting", "pending"  # recorded a moment before its agent is created
        return
    if agent is None:
        v.state = "failed"
        alive = _orphan_alive(ray, cluster_agent, info, rec.id, timeout)
        v.error = (f"orphan: its agent is gone but the engine still runs on {info.get('node_ip')}; "
                   f"`sage-llm stop {rec.name}` stops it" if alive else
                   f"its agent on {info.get('node_ip')} is gone and so is the engine; "
                   f"`sage-llm stop {rec.name}` removes the record")
        return
    if rec.state == "launching":
        ref = agent.where.remote()
        if not ray.wait([ref], timeout=1.0)[0]:
            v.state, v.stage = "starting", "pending"
            v.error = "waiting for Ray to place it on a node with the GPUs free"
            return
        with contextlib.suppress(Exception):
            _placed(ray.get(ref), rec, store)
        v.host, v.port, v.base_url, v.pid = rec.host, rec.port, rec.base_url, (rec.cluster or {}).get("pid")
        info = rec.cluster or info
        v.cluster.update({"node_id": info.get("node_id"), "node_address": info.get("node_ip")})
        if rec.state == "failed":
            v.state, v.error = "failed", rec.error
            return
    try:
        st = ray.get(agent.poll.remote(5), timeout=timeout)
    except Exception as exc:
        v.state, v.error = "unhealthy", f"its agent did not answer: {str(exc).splitlines()[-1][:160]}"
        return
    if st["ready"]:
        v.state, v.stage, v.progress = "ready", "ready", 1.0
    elif st["alive"]:
        v.state, v.stage = "starting", "loading"
    else:
        from sage_llm.observe.diagnose import diagnose

        d = diagnose(st["lines"], {"port": rec.port, "model": rec.model, "name": rec.name})
        v.state = "failed"
        v.error = "engine exited unexpectedly" + (f": {d.message}" if d else "")


def _age_s(rec: EngineRecord) -> float:
    """Seconds since the record's start (a large number when its time cannot be read)."""
    from sage_llm.core.state import parse_iso

    started = parse_iso(rec.started_at)
    return 1e9 if started is None else time.time() - started


def describe_view(info: dict[str, Any]) -> str:
    """One line for the human status view."""
    node = info.get("node_address") or "no node yet"
    short = f" ({info['node_id'][:8]})" if info.get("node_id") else ""
    dead = ", dead" if info.get("node_alive") is False else ""
    return f"on node {node}{short}{dead} of Ray cluster {info['address']}, {info.get('gpus') or 0} GPU(s)"


def _orphan_alive(ray: Any, cluster_agent: Any, info: dict[str, Any], engine_id: str, timeout: float) -> bool:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not info.get("node_id"):
        return False
    task = ray.remote(num_cpus=0)(cluster_agent.node_engines).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(info["node_id"], soft=False))
    try:
        entries = ray.get(task.remote(), timeout=timeout)
    except Exception:
        return False
    return any(e["engine_id"] == engine_id and e["alive"] for e in entries)


def liveness(rec: EngineRecord, timeout: float = 3.0) -> str:
    """After a request to a cluster engine broke off: "alive", "died" (its agent says the engine exited), "lost" (the
    agent is gone or does not answer, and nothing listens on the engine's port: the node itself may be down) or
    "unknown" (Ray did not answer in time and the port still answers). Bounded by `timeout` (twice, at most), never
    raising."""
    info = rec.cluster or {}
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            ray = connect(info["address"], timeout=timeout)
            agent = _get_actor(ray, rec.name)
            if agent is None:
                answer["state"] = "gone"
                return
            st = ray.get(agent.poll.remote(1), timeout=timeout)
            answer["state"] = "alive" if st["alive"] else "died"
        except Exception as exc:  # an actor on a dead node, a GCS gone: decided by the port below
            answer["error"] = type(exc).__name__

    asker = threading.Thread(target=ask, daemon=True, name="ray-liveness")
    asker.start()
    asker.join(timeout + 0.5)
    if answer.get("state") in ("alive", "died"):
        return str(answer["state"])
    try:
        with socket.create_connection((rec.host, int(rec.port)), timeout=min(timeout, 1.0)):
            return "unknown"  # something still listens there
    except OSError:
        return "lost"


# ------------------------------------------------------------------------------------------------------- logs
def fetch_log(rec: EngineRecord, dest: Path) -> bool:
    """Copy the engine's log from its node (through the agent) to `dest`; False when the agent is gone."""
    info = rec.cluster or {}
    ray = connect(info["address"])
    agent = _get_actor(ray, rec.name)
    if agent is None:
        return False
    data = ray.get(agent.log_bytes.remote(), timeout=CALL_TIMEOUT_S)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return True
