"""`start --cluster`: whole engines placed on the nodes of a Ray cluster, with the fake vLLM.

The cluster is Ray's own `ray.cluster_utils.Cluster`: a head (node A, no GPU) and one more raylet (node B, one GPU as
Ray counts it, and a custom resource `node_b`) on this machine, on loopback. Each node has its own node-state dir.
Everything the tests start goes through the real CLI entry (`cli` fixture) and the real agent actor on the node.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from sage_llm.core.state import EngineRecord, StateStore
from tests.conftest import FAKE_VLLM, free_port

# a loopback cluster: Ray reads this when it is imported (docs/distributed.md, "Loopback clusters"); set for the
# import only, so the other tests of the session see the environment they expect
_had_flag = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in os.environ
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
if not _had_flag:
    os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning"),
              # thread method: a call stuck inside Ray's C++ core never returns to Python, so the signal method cannot
              # end it (seen once, under heavy load: not reproduced since); this way it fails with every stack
              pytest.mark.timeout(240, method="thread")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (A) + node B; the fake vLLM as the nodes' engine; per-node state dirs. Torn down with nothing left."""
    base = tmp_path_factory.mktemp("ray-cluster")
    saved = {k: os.environ.get(k) for k in ("SAGE_LLM_VLLM", "FAKE_VLLM_LOAD_S", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ["SAGE_LLM_VLLM"] = f"{sys.executable} {FAKE_VLLM}"
    os.environ["FAKE_VLLM_LOAD_S"] = "0.3"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    state = {"a": base / "node-a", "b": base / "node-b"}
    engine = {"SAGE_LLM_VLLM": os.environ["SAGE_LLM_VLLM"], "FAKE_VLLM_LOAD_S": "0.3"}  # what the nodes run
    common = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
              "min_worker_port": 24100, "max_worker_port": 24199, "object_store_memory": 80 * 1024 * 1024}
    # a dead node is declared after 2 missed health checks 1 s apart (Ray's default: about 14 s)
    fast_death = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2, "health_check_timeout_ms": 1000}
    head_env = {**engine, "SAGE_LLM_NODE_STATE_DIR": str(state["a"])}
    c = Cluster(initialize_head=True, head_node_args={**common, "resources": {"node_a": 1},
                                                      "_system_config": fast_death, "env_vars": head_env})
    node_b_args = {**common, "min_worker_port": 24200, "max_worker_port": 24299, "num_gpus": 1,
                   "resources": {"node_b": 1}, "env_vars": {**engine, "SAGE_LLM_NODE_STATE_DIR": str(state["b"])}}
    node_b = c.add_node(**node_b_args)
    c.wait_for_nodes()
    try:
        yield {"address": c.address, "cluster": c, "node_b": node_b.node_id, "head": c.head_node.node_id,
               "state": state, "node_b_obj": node_b, "node_b_args": node_b_args}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        _sweep_left(state)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sweep_left(state: dict[str, Path]) -> None:
    """Whatever a failed test left on the nodes: stopped by the agents' own sweep, node by node (with Ray down, no
    agent is alive, so every recorded engine is an orphan)."""
    from sage_llm.engine import cluster_agent

    saved = os.environ.get(cluster_agent.NODE_STATE_ENV)
    try:
        for d in state.values():
            os.environ[cluster_agent.NODE_STATE_ENV] = str(d)
            cluster_agent.sweep(grace=2.0)
    finally:
        if saved is None:
            os.environ.pop(cluster_agent.NODE_STATE_ENV, None)
        else:
            os.environ[cluster_agent.NODE_STATE_ENV] = saved


def _status(cli, name: str | None = None) -> list[dict]:
    """`status --json` engines; the document is plain JSON (no Ray message on stdout) and valid against the schema."""
    import jsonschema

    import sage_llm

    args = ["status", "--json"] + ([name] if name else [])
    code, out, err = cli(*args)
    assert out.startswith("{"), (out[:300], err[-300:])
    doc = json.loads(out)
    jsonschema.validate(doc, json.loads((Path(sage_llm.__file__).parent / "data" / "status.schema.json").read_text()))
    return doc["engines"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def _entries(state_dir: Path) -> list[str]:
    d = state_dir / "engines"
    return sorted(p.name for p in d.glob("*.json")) if d.is_dir() else []


def _actor_state(name: str) -> str | None:
    """Ray's state of the named actor (GCS table: PENDING_CREATION, ALIVE, RESTARTING, DEAD), None when unknown."""
    from ray._private.state import actors

    states = [a["State"] for a in actors().values() if a.get("Name") == name]
    states = [st if isinstance(st, str) else str(st) for st in states]
    return next((st for st in states if st != "DEAD"), states[0] if states else None)


def _actor_names() -> set[str]:
    """Named actors alive on the cluster (this process is connected to it by the CLI calls made in-process)."""
    if not ray.is_initialized():
        return set()
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(cli, cluster):
    addr = cluster["address"]
    code, _out, err = cli("start", "org/m", "--cluster", addr, "--node", "no-such-node", "--port", str(free_port()))
    assert code == 2
    assert "--node 'no-such-node' is not a node of the cluster" in err
    assert "Traceback" not in err
    code, _out, err = cli("start", "org/m", "--cluster", addr, "-tp", "2", "--port", str(free_port()))
    assert code == 2
    assert "no node of the cluster has 2 GPU(s)" in err
    assert "0/1 GPU" not in err
    assert "1/1 GPU" in err
    code, _out, err = cli("start", "org/m", "--cluster", addr, "--node", "node_a", "--port", str(free_port()))
    assert code == 2
    assert "has 0 GPU(s), the engine needs 1" in err
    dead = f"127.0.0.1:{free_port()}"
    code, _out, err = cli("start", "org/m", "--cluster", dead)
    assert code == 2
    assert f"the Ray cluster at {dead} is unreachable" in err
    code, _out, err = cli("start", "org/m", "--cluster", addr, "--ray-address", addr)
    assert code == 2
    assert "--cluster and --ray-address do not go together" in err
    code, _out, err = cli("start", "org/m", "--node", "x")
    assert code == 2
    assert "--node needs --cluster" in err
    assert StateStore().names() == []
    assert not any(n.startswith("sage-llm-engine:") for n in _actor_names())


def test_place_by_node_name_serve_status_logs_stop(cli, cluster):
    import httpx

    port = free_port()
    code, out, err = cli("start", "org/model-a", "--name", "c1", "--cluster", cluster["address"], "--node", "node_b",
                         "--port", str(port))
    assert code == 0, err
    rec = StateStore().load("c1")
    assert "ready" in out
    assert f"(pid {rec.cluster['pid']} on node 127.0.0.1)" in out
    assert isinstance(rec, EngineRecord)
    assert rec.cluster
    assert rec.pid is None
    assert rec.cluster["node_id"] == cluster["node_b"]
    assert rec.cluster["gpus"] == 1
    engine_pid = rec.cluster["pid"]
    assert _pid_alive(engine_pid)
    # the engine runs in its own session (not the Ray worker's), not niced, without Ray's OMP_NUM_THREADS
    assert os.getsid(engine_pid) == engine_pid
    assert Path(rec.cluster["tmp_dir"]).is_dir()
    assert os.getpriority(os.PRIO_PROCESS, engine_pid) == 0
    environ = Path(f"/proc/{engine_pid}/environ").read_bytes().split(b"\0")
    assert not any(e.startswith(b"OMP_NUM_THREADS=") for e in environ)
    assert _entries(cluster["state"]["b"]) == [f"{rec.id}.json"]
    assert _entries(cluster["state"]["a"]) == []
    [view] = _status(cli, "c1")
    assert view["state"] == "ready"
    assert view["cluster"]["node_id"] == cluster["node_b"]
    assert view["cluster"]["node_alive"] is True
    assert view["cluster"]["gpus"] == 1
    assert view["base_url"] == f"http://127.0.0.1:{rec.port}/v1"
    assert view["pid"] == engine_pid
    r = httpx.get(view["base_url"] + "/models", timeout=5)
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == "org/model-a"
    code, out, err = cli("status")
    assert code == 0, err
    assert f"c1: on node 127.0.0.1 ({cluster['node_b'][:8]}) of Ray cluster {cluster['address']}, 1 GPU(s)" in out
    code, out, err = cli("chat", "c1", "-p", "hi", "--plain")
    assert code == 0, err
    assert out.strip()
    code, out, err = cli("bench", "c1", "-c", "1", "-n", "2", "--max-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["completed"] == 2
    code, out, _err = cli("logs", "c1", "-n", "50")
    assert code == 0
    assert "sage llm start c1 (cluster agent" in out
    code, out, err = cli("stop", "c1")
    assert code == 0, err
    assert _wait_gone(engine_pid, 1.0)
    assert StateStore().names() == []
    assert _entries(cluster["state"]["b"]) == []
    assert rec.cluster["tmp_dir"].endswith(f"/sage-llm-{rec.id}")
    assert not Path(rec.cluster["tmp_dir"]).exists()
    assert "sage-llm-engine:c1" not in _actor_names()


def test_placement_by_resources_and_pending_when_full(cli, cluster):
    from sage_llm import api

    # no --node: Ray puts the engine where its GPU is (node B, the only node with one)
    code, _out, err = cli("start", "org/model-a", "--name", "c2", "--cluster", cluster["address"],
                          "--port", str(free_port()))
    assert code == 0, err
    rec = StateStore().load("c2")
    assert isinstance(rec, EngineRecord)
    assert rec.cluster
    assert rec.cluster["node_id"] == cluster["node_b"]
    # a second engine needing a GPU: Ray leaves it pending (never two engines on one GPU)
    api.start(api.LaunchRequest(model="org/model-b", name="c3", cluster=cluster["address"], port=free_port(),
                                wait=False))
    # waiting for placement is bounded by --timeout, and leaves nothing behind; that c4, asked for after c3, was
    # refused a GPU for 3 s, with Ray counting 0 of the cluster's 1 free, is what proves c3 had no GPU to take in that
    # time either (a fixed sleep before looking at c3 proved nothing: c3 may not have been scheduled yet)
    code, _out, err = cli("start", "org/model-b", "--name", "c4", "--cluster", cluster["address"], "--timeout", "3",
                          "--port", str(free_port()))
    assert code == 1
    assert "was not placed within 3 s" in err
    assert "0/1 GPU" in err
    assert StateStore().load("c4") is None
    [view] = _status(cli, "c3")
    assert view["state"] == "starting"
    assert view["stage"] == "pending"
    assert _actor_state("sage-llm-engine:c3") == "PENDING_CREATION"  # Ray's own word: not placed anywhere
    assert len(_entries(cluster["state"]["b"])) == 1  # node B runs c2 alone
    # once c2 is stopped, Ray places c3: its agent launches it by itself (the --no-wait CLI is long gone)
    pid = rec.cluster["pid"]
    code, _out, err = cli("stop", "c2")
    assert code == 0, err
    assert _wait_gone(pid, 1.0)
    deadline = time.monotonic() + 60
    while (view := _status(cli, "c3")[0])["state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert view["state"] == "ready", view
    rec3 = StateStore().load("c3")
    assert isinstance(rec3, EngineRecord)
    assert rec3.cluster
    assert rec3.cluster["node_id"] == cluster["node_b"]
    assert rec3.state == "running"
    assert _pid_alive(rec3.cluster["pid"])
    code, _out, err = cli("stop", "c3")
    assert code == 0, err
    assert _wait_gone(rec3.cluster["pid"], 1.0)
    assert StateStore().load("c3") is None
    assert "sage-llm-engine:c3" not in _actor_names()
    assert _entries(cluster["state"]["b"]) == []

    # a pending engine that is stopped before it is ever placed: its agent goes, nothing was started
    api.start(api.LaunchRequest(model="org/model-b", name="c5", cluster=cluster["address"], port=free_port(),
                                wait=False))
    api.start(api.LaunchRequest(model="org/model-b", name="c6", cluster=cluster["address"], port=free_port(),
                                wait=False))
    pending = [n for n in ("c5", "c6") if _status(cli, n)[0]["stage"] == "pending"]
    assert len(pending) == 1
    for name in (*pending, *({"c5", "c6"} - set(pending))):
        code, _out, err = cli("stop", name)
        assert code == 0, err
    assert StateStore().names() == []
    assert _entries(cluster["state"]["b"]) == []


def test_agent_sigkilled_orphan_reported_stopped_and_swept(cli, cluster):
    addr = cluster["address"]
    code, _out, err = cli("start", "org/model-a", "--name", "o1", "--cluster", addr, "--port", str(free_port()))
    assert code == 0, err
    rec = StateStore().load("o1")
    assert isinstance(rec, EngineRecord)
    assert rec.cluster
    engine_pid, agent_pid = rec.cluster["pid"], rec.cluster["agent_pid"]
    os.kill(agent_pid, signal.SIGKILL)  # Ray alone leaves the engine running: it is in its own session
    assert _wait_gone(agent_pid)
    deadline = time.monotonic() + 30
    while "sage-llm-engine:o1" in _actor_names() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pid_alive(engine_pid)
    [view] = _status(cli, "o1")
    assert view["state"] == "failed"
    assert view["error"].startswith("orphan: its agent is gone but the engine still runs")
    code, out, err = cli("stop", "o1")
    assert code == 0, err
    assert _wait_gone(engine_pid, 1.0)
    assert StateStore().load("o1") is None
    assert _entries(cluster["state"]["b"]) == []

    # the other path: an agent killed with its node state left; the next agent on that node sweeps the group
    code, _out, err = cli("start", "org/model-a", "--name", "o2", "--cluster", addr, "--port", str(free_port()))
    assert code == 0, err
    rec2 = StateStore().load("o2")
    assert isinstance(rec2, EngineRecord)
    assert rec2.cluster
    os.kill(rec2.cluster["agent_pid"], signal.SIGKILL)
    assert _wait_gone(rec2.cluster["agent_pid"])
    deadline = time.monotonic() + 30
    while "sage-llm-engine:o2" in _actor_names() and time.monotonic() < deadline:
        time.sleep(0.2)
    code, _out, err = cli("start", "org/model-a", "--name", "o3", "--cluster", addr, "--port", str(free_port()))
    assert code == 0, err
    assert _wait_gone(rec2.cluster["pid"], 1.0)  # swept by o3's agent when it started
    [view] = _status(cli, "o2")
    assert view["state"] == "failed"
    assert "is gone and so is the engine" in view["error"]
    for name in ("o2", "o3"):
        code, _out, err = cli("stop", name)
        assert code == 0, err
    assert StateStore().names() == []
    assert _entries(cluster["state"]["b"]) == []


def test_dead_node_fails_its_engines_and_the_next_agent_there_sweeps_them(cli, cluster):
    """Runs last: it kills node B's Ray (and brings a new node B up on the same node state).

    The node dies hard: its agent and its raylet are SIGKILLed (as by the OOM killer or `ray stop --force`), so
    nothing of Ray stops the engine, which runs on in its own session. That is what the next agent on the node must
    clean up, so the test checks the engine still runs right up to that agent's start and is gone right after. (A
    raylet that dies alone lets its workers exit, and Ray kills a worker's children as it exits: the engine would die
    with the node and the final check would pass whatever the agents do.)"""
    from ray._private import ray_constants

    addr = cluster["address"]
    code, _out, err = cli("start", "org/model-a", "--name", "d1", "--cluster", addr, "--port", str(free_port()))
    assert code == 0, err
    rec = StateStore().load("d1")
    assert isinstance(rec, EngineRecord)
    assert rec.cluster
    engine_pid = rec.cluster["pid"]
    node_b = cluster["node_b_obj"]
    [raylet] = node_b.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    os.kill(rec.cluster["agent_pid"], signal.SIGKILL)
    raylet.process.kill()
    raylet.process.wait()
    assert _wait_gone(rec.cluster["agent_pid"])
    deadline = time.monotonic() + 60
    while (view := _status(cli, "d1")[0])["state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert view["state"] == "failed", view
    assert "is dead" in view["error"]
    assert view["cluster"]["node_alive"] is False
    cluster["cluster"].remove_node(node_b, allow_graceful=False)  # the rest of node B's Ray processes
    code, out, err = cli("stop", "d1")  # its node is dead: the record goes, the engine there cannot be reached
    assert code == 0, err
    assert StateStore().load("d1") is None
    assert _pid_alive(engine_pid), "the engine died with its node: the sweep below would prove nothing"
    assert [e for e in _entries(cluster["state"]["b"])], "node B's state lost the dead agent's engine"
    # node B comes back (same node-local state): the first agent placed there stops what the dead one left
    cluster["node_b_obj"] = cluster["cluster"].add_node(**cluster["node_b_args"])
    cluster["cluster"].wait_for_nodes()
    code, _out, err = cli("start", "org/model-a", "--name", "d2", "--cluster", addr, "--node", "node_b",
                          "--port", str(free_port()))
    assert code == 0, err
    assert _wait_gone(engine_pid, 1.0)
    code, _out, err = cli("stop", "d2")
    assert code == 0, err
    assert StateStore().names() == []
    assert _entries(cluster["state"]["b"]) == []


def test_the_gateway_routes_to_an_engine_started_with_start_cluster_and_shows_its_node(cli, cluster):
    """An engine placed on node B by hand (`start --cluster`) is served through a gateway of this machine (started
    without --cluster): routed by its model name, its node in /api/engines."""
    import httpx

    code, out, err = cli("start", "org/model-c", "--name", "c3", "--cluster", cluster["address"], "--node", "node_b",
                         "--port", str(free_port()))
    assert code == 0, err
    gw_port = free_port()
    code, out, err = cli("gateway", "start", "--port", str(gw_port), "--engine-port", str(free_port()),
                         "--no-external", "--no-fallback", "--json")
    assert code == 0, err
    try:
        url = f"http://127.0.0.1:{gw_port}"
        deadline = time.monotonic() + 60
        while True:  # the gateway's refresh finds the engine through its record and its agent
            models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
            if any(m["id"] == "org/model-c" and m["state"] == "ready" for m in models):
                break
            assert time.monotonic() < deadline, models
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       json={"model": "org/model-c", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-sage-llm-engine"] == "c3"
        engines = {e["name"]: e for e in httpx.get(f"{url}/api/engines", timeout=10).json()["engines"]}
        assert engines["c3"]["node"] == "127.0.0.1"
        assert engines["c3"]["managed_by_gateway"] is False  # not the gateway's: never unloaded by it
    finally:
        code, _out, err = cli("gateway", "stop")
        assert code == 0, err
        code, _out, err = cli("stop", "c3")
        assert code == 0, err
