"""`gateway run --cluster ADDRESS`: the gateway's on-demand loads placed on the nodes of a Ray cluster through the
agent of `start --cluster`, with the fake vLLM as the nodes' engine.

The cluster is Ray's own `ray.cluster_utils.Cluster` on loopback: a head A (no GPU; the gateway's machine) and nodes
B and C with one GPU each as Ray counts them, so every engine asks Ray for one GPU and Ray places it on B or C. The
gateway runs in a thread of the test process (tests/gateway/conftest.py) and joins the cluster like any driver. The
engines' key is SAGE_LLM_CLUSTER_KEY, set in the gateway's environment and in every node's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import httpx
import pytest

from sage_llm.core.state import EngineRecord, StateStore
from tests.conftest import FAKE_VLLM, free_port
from tests.gateway.conftest import MODEL_A, MODEL_B
from tests.gateway.test_lifecycle import card, wait_for
from tests.support.ray_loopback import import_ray

ray = import_ray()
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.timeout(300, method="thread")]

KEY = "sk-cluster-test-0123456789abcdef"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head A (no GPU) + nodes B and C (one GPU each); the fake vLLM on the nodes; torn down with nothing left."""
    base = tmp_path_factory.mktemp("ray-gw-cluster")
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    engine = {"SAGE_LLM_VLLM": f"{sys.executable} {FAKE_VLLM}", "FAKE_VLLM_LOAD_S": "0.3",
              "SAGE_LLM_CLUSTER_KEY": KEY}
    state = {n: base / f"node-{n}" for n in "abc"}
    common = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
              "object_store_memory": 80 * 1024 * 1024}
    c = Cluster(initialize_head=True, head_node_args={
        **common, "min_worker_port": 24600, "max_worker_port": 24699, "resources": {"node_a": 1},
        "env_vars": {**engine, "SAGE_LLM_NODE_STATE_DIR": str(state["a"])}})
    ids = {"a": c.head_node.node_id}
    for n, lo in (("b", 24700), ("c", 24800)):
        node = c.add_node(**common, min_worker_port=lo, max_worker_port=lo + 99, num_gpus=1, resources={f"node_{n}": 1},
                          env_vars={**engine, "SAGE_LLM_NODE_STATE_DIR": str(state[n])})
        ids[n] = node.node_id
    c.wait_for_nodes()
    try:
        yield {"address": c.address, "ids": ids, "state": state}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        from tests.cli.test_cluster_fake import _sweep_left

        _sweep_left(state)
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved


@pytest.fixture
def on_cluster(cluster, gateway, monkeypatch):
    """gateway(**options) with --cluster; every cluster engine left at teardown is stopped through its agent."""
    monkeypatch.setenv("SAGE_LLM_CLUSTER_KEY", KEY)

    def make(**kw):
        kw.setdefault("place_s", 1.5)
        return gateway(cluster=cluster["address"], fallback=False, **kw)

    yield make
    from sage_llm import api

    for name in StateStore().names():
        api.stop(name, force=True)


def records(placed: bool = False) -> dict[str, EngineRecord]:
    """The engine records; `placed`: only engines on a node (not an agent still waiting for Ray to place it)."""
    store = StateStore()
    return {n: r for n in store.names() if isinstance(r := store.load(n), EngineRecord)
            and not (placed and r.state == "launching")}


def ready_replicas(gw, model: str = MODEL_A) -> list[str]:
    return sorted(r["engine"] for r in card(gw, model).get("replicas", []) if r["state"] == "ready")


def chat(gw, model: str, session: str = "s0") -> httpx.Response:
    return gw.post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]},
                   headers={"x-session-id": session}, timeout=60)


def test_bad_cluster_options_are_one_line_exit_2_and_start_nothing(cli, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SAGE_LLM_CLUSTER_KEY", KEY)
    for args, words in ((["--cluster", "not-an-address"], "is not HOST:PORT"),
                        (["--cluster", f"127.0.0.1:{free_port()}"], "is unreachable"),
                        (["--cluster", "127.0.0.1:6379", "--cluster-key-env", "1BAD"], "is not a variable name")):
        code, out, err = cli("gateway", "run", "--port", str(free_port()), *args)
        assert code == 2, (args, out, err)
        assert words in err, err
        assert "Traceback" not in err
    monkeypatch.delenv("SAGE_LLM_CLUSTER_KEY")
    code, _out, err = cli("gateway", "start", "--cluster", "127.0.0.1:6379")
    assert code == 2
    assert "SAGE_LLM_CLUSTER_KEY" in err
    assert "every node" in err
    config = tmp_path / "pinned.toml"
    config.write_text(f'[gateway.models."{MODEL_A}"]\nnode = "node_b"\n')
    monkeypatch.setenv("SAGE_LLM_CONFIG", str(config))
    code, _out, err = cli("gateway", "start")
    assert code == 2
    assert "needs a cluster" in err
    from sage_llm.gateway import daemon

    assert daemon.load_record() is None  # nothing started


def test_loads_go_to_the_nodes_replicas_to_distinct_ones_and_room_is_made_on_the_node_that_fits(cluster, on_cluster
                                                                                                   ) -> None:
    gw = on_cluster(replicas=[f"{MODEL_A}=2"])
    r = chat(gw, MODEL_A)
    assert r.status_code == 200, r.text
    two = wait_for(lambda: len(ready_replicas(gw)) == 2 and ready_replicas(gw), timeout=60)
    recs = records()
    nodes = {recs[n].cluster["node_id"] for n in two}
    assert nodes == {cluster["ids"]["b"], cluster["ids"]["c"]}  # one replica on each GPU node, none on the head
    assert all(recs[n].cluster.get("gateway") for n in two)  # the gateway's own: unloaded by it
    assert all(recs[n].api_key_env == "SAGE_LLM_CLUSTER_KEY" for n in two)
    assert KEY not in " ".join(" ".join(recs[n].argv or []) + str(recs[n].env) for n in two)
    engines = {e["name"]: e for e in gw.client.get("/api/engines").json()["engines"]}
    assert {engines[n]["node"] for n in two} == {"127.0.0.1"}
    assert all(engines[n]["managed_by_gateway"] for n in two)
    for i in range(6):
        r = chat(gw, MODEL_A, f"s{i}")
        assert r.status_code == 200, r.text
        assert r.headers["x-sage-llm-engine"] in two
    # both GPU nodes are full: a load of B must make room, on a node where B fits (B or C), by evicting the least
    # recently used idle replica there, and B lands on that node
    wait_for(lambda: all(rep["in_flight"] == 0 for rep in card(gw, MODEL_A)["replicas"]))
    before = records()
    r = chat(gw, MODEL_B)
    assert r.status_code == 200, r.text
    after = records(placed=True)
    ids = {rec.id for rec in after.values()}
    gone = [rec for rec in before.values() if rec.id not in ids]
    assert len(gone) == 1, (before, after)
    assert gone[0].name in two
    b_name = next(n for n, rec in after.items() if rec.model == MODEL_B)
    assert after[b_name].cluster["node_id"] == gone[0].cluster["node_id"]
    # model A is below min_replicas now, but bringing its replica back never evicts B in turn: it waits for room
    wait_for(lambda: "no room for replica" in (card(gw, MODEL_A).get("error") or "")
             or any("no room for replica" in (rep.get("error") or "") for rep in card(gw, MODEL_A)["replicas"]),
             timeout=30)
    assert card(gw, MODEL_B)["state"] == "ready"
    assert b_name in records()


def test_a_dead_replica_is_retried_around_and_replaced_and_a_restarted_gateway_adopts_the_engines(on_cluster
                                                                                                   ) -> None:
    gw = on_cluster(replicas=[f"{MODEL_A}=2"], refresh_s=3600, keep_engines=True)
    assert chat(gw, MODEL_A).status_code == 200
    two = wait_for(lambda: len(ready_replicas(gw)) == 2 and ready_replicas(gw), timeout=60)
    victim = two[0]
    rec = records()[victim]
    os.kill(rec.cluster["pid"], signal.SIGKILL)  # the engine dies on its node; its agent lives on
    sessions = [f"s{i}" for i in range(12)]
    results = [chat(gw, MODEL_A, s) for s in sessions]  # some of them are routed to the dead one first
    assert [r.status_code for r in results] == [200] * len(sessions)
    assert {r.headers["x-sage-llm-engine"] for r in results} == {two[1]}
    # the gateway asked the agent (the engine exited), counted a crash, and started a replacement
    def replaced() -> bool:
        now, recs = ready_replicas(gw), records()
        return len(now) == 2 and all(n in recs and recs[n].id != rec.id for n in now)

    wait_for(replaced, timeout=60)
    kept = {n: r.id for n, r in records().items()}
    gw.stop()  # --keep-engines: the engines stay on their nodes
    assert {n: r.id for n, r in records().items()} == kept
    gw2 = on_cluster(replicas=[f"{MODEL_A}=2"], keep_engines=False)
    adopted = wait_for(lambda: len(ready_replicas(gw2)) == 2 and ready_replicas(gw2), timeout=60)
    assert set(adopted) == set(kept)
    assert chat(gw2, MODEL_A).status_code == 200
    assert {n: r.id for n, r in records().items()} == kept  # adopted, not started again
    gw2.stop()  # without --keep-engines: it stops them through their agents
    assert records() == {}
    assert {a.get("Name") for a in ray.util.list_named_actors(all_namespaces=True)
            if isinstance(a, dict)} & {f"sage-llm-engine:{n}" for n in kept} == set()


@pytest.mark.parametrize("on_a_cluster", [False, True])
def test_a_gateway_never_imports_ray(cli, fake_vllm, hub, cluster, monkeypatch, on_a_cluster) -> None:
    """Ray is installed here, yet a detached gateway that loads and serves a model has none of Ray in its process
    (its shared library would be mapped): without --cluster, and with it (its Ray worker process holds the driver)."""
    monkeypatch.setenv("SAGE_LLM_CLUSTER_KEY", KEY)
    port = free_port()
    extra = ["--cluster", cluster["address"]] if on_a_cluster else []
    code, out, err = cli("gateway", "start", "--port", str(port), "--engine-port", str(free_port()), "--no-external",
                         "--no-fallback", "--json", *extra)
    assert code == 0, err
    pid = __import__("json").loads(out)["pid"]
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": MODEL_A, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert httpx.get(f"http://127.0.0.1:{port}/api/local-engine/status", timeout=10).status_code == 200
        maps = open(f"/proc/{pid}/maps").read()
        assert "_raylet" not in maps
        if on_a_cluster:
            assert any(r.cluster for r in records().values())  # it was placed on the cluster
    finally:
        code, _out, err = cli("gateway", "stop")
        assert code == 0, err


def test_the_head_gone_never_takes_the_gateway_down_loads_get_503_and_the_rest_serves(gateway, monkeypatch, tmp_path
                                                                                        ) -> None:
    """Ray ends a driver whose head (GCS) has been gone for a while (60 s by default, 3 s here): the gateway holds no
    Ray driver of its own (its worker process does), so it lives on. A load is refused with 503 (the cluster is
    unreachable: a passing fault, not the client's mistake), /health answers, and the gateway never maps Ray."""
    import subprocess

    monkeypatch.setenv("SAGE_LLM_CLUSTER_KEY", KEY)
    monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", "3")  # read by the worker's Ray driver
    port, temp = free_port(), f"/tmp/rg{os.getpid() % 100000}"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus",
                    "1", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp,
                    "--min-worker-port", "24900", "--max-worker-port", "24999"], check=True, env=env,
                   capture_output=True, timeout=120)
    try:
        gw = gateway(cluster=f"127.0.0.1:{port}", fallback=False)
        _kill_head(temp)
        deadline = time.monotonic() + 60
        while True:  # the worker's driver ends once the head has been gone 3 s; the gateway does not
            r = chat(gw, MODEL_A)
            assert r.status_code == 503, r.text
            assert "failed to load" in r.json()["error"]["message"]
            if "ended" in r.text or "unreachable" in r.text or time.monotonic() > deadline:
                break
            time.sleep(1)
        time.sleep(4)
        assert gw.client.get("/health").status_code == 200
        r = chat(gw, MODEL_A)
        assert r.status_code == 503, r.text
        assert records() == {}
    finally:
        _kill_head(temp)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _kill_head(temp: str) -> None:
    """SIGKILL the processes of the Ray head started with --temp-dir `temp` (only those: their command lines name it,
    or their session directory under it)."""
    from pathlib import Path

    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if temp.encode() in (d / "cmdline").read_bytes():
                os.kill(int(d.name), signal.SIGKILL)


def test_a_gateway_whose_key_differs_from_the_nodes_says_so_and_leaves_nothing(cluster, gateway, monkeypatch) -> None:
    """The nodes' SAGE_LLM_CLUSTER_KEY is another value than the gateway's: the engine would refuse every request.
    The load fails with 503 naming the variable, and the engine it started is stopped."""
    monkeypatch.setenv("SAGE_LLM_CLUSTER_KEY", "sk-some-other-value")
    gw = gateway(cluster=cluster["address"], fallback=False, place_s=1.5)
    r = chat(gw, MODEL_A)
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "refuses this gateway's key" in message
    assert "$SAGE_LLM_CLUSTER_KEY" in message
    assert "sk-some-other-value" not in r.text
    assert records() == {}


def test_a_replica_whose_node_went_silent_is_forgotten_at_once_and_replaced(on_cluster) -> None:
    """A node going down before Ray declares it dead: the engine's port refuses and its agent does not answer (here:
    the engine SIGKILLed and the agent SIGSTOPped). Requests are retried on the other replica; the lost one is not
    stopped through its agent (that waits out a minute of timeouts) but forgotten, and its replacement serves
    within seconds."""
    gw = on_cluster(replicas=[f"{MODEL_A}=2"], refresh_s=3600)
    assert chat(gw, MODEL_A).status_code == 200
    two = wait_for(lambda: len(ready_replicas(gw)) == 2 and ready_replicas(gw), timeout=60)
    lost = records()[two[0]]
    agent_pid = lost.cluster["agent_pid"]
    os.kill(agent_pid, signal.SIGSTOP)
    try:
        os.kill(lost.cluster["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        results = [chat(gw, MODEL_A, f"s{i}") for i in range(8)]
        assert [r.status_code for r in results] == [200] * 8

        def replaced() -> bool:
            now, recs = ready_replicas(gw), records()
            return len(now) == 2 and all(n in recs and recs[n].id != lost.id for n in now)

        wait_for(replaced, timeout=40)  # stopping it through its silent agent would take over 60 s
        print(f"replaced {time.monotonic() - t0:.1f} s after the engine died")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent_pid, signal.SIGCONT)
