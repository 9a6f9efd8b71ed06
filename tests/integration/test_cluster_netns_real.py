"""The cluster on Ray nodes in network + PID namespaces of this test's own (tests/support/netns.py: a veth pair, or a
bridge for more nodes, on a blackholed test subnet; Ray's `ray stop` walks every process it can see, so each node
gets its own PID namespace and /proc):
* `start --cluster` with the real CPU vLLM: the engine on node B, the CLI on node A (about 5 minutes on 2 cores);
* a gateway with `--cluster` on node A loads the real CPU vLLM on node B on demand (about 45 s: some 30-35 s from
  `gateway start` to the first answer, most of it vLLM's load);
* a node killed under load, fake engines (about 30 s; 2.5 minutes when the replacement does not come).

Network rules: the test subnet is blackholed in the root namespace first (a mistaken packet cannot leave the
machine) and the route is removed at cleanup; traffic stays on the namespaces' links. Needs root, `ip`, `unshare`,
`nsenter`, `pgrep`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_REPLY, engine_dir
from tests.support import netns
from tests.support.discipline import skip_or_fail

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

VENV_BIN = netns.VENV_BIN
KEY_ENV = "SAGE_LLM_CLUSTER_KEY"


def _engine_pids(engine_id: str) -> list[int]:
    """Every process on this machine (any namespace: the root one sees them all) carrying the engine's id."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if f"SAGE_LLM_ENGINE_ID={engine_id}".encode() in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
    return found


_wait = netns.wait


@pytest.fixture
def netns_cluster(tmp_path, _tiny_cache):
    """Node A (the head: the CLI runs there) and node B (the real vLLM), each with its own node-state dir."""
    why = netns.missing()
    if why:
        skip_or_fail(why)
    key = {KEY_ENV: secrets.token_urlsafe(24)}  # what a gateway with --cluster gives its engines: read on the node
    hub = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(_tiny_cache)}
    env_a = {"SAGE_LLM_NODE_STATE_DIR": str(tmp_path / "node-a"), **key, **hub}
    env_b = {"SAGE_LLM_NODE_STATE_DIR": str(tmp_path / "node-b"), **key, **hub,
             "SAGE_LLM_VLLM": str(engine_dir() / "bin" / "vllm")}
    with netns.ray_cluster(2, node_env=[env_a, env_b], node_args=[["--num-cpus", "1"], ["--num-cpus", "1"]]) as c:
        a, b = c.nodes
        client_env = {**a.env, "SAGE_LLM_HOME": str(tmp_path / "client"), "NO_COLOR": "1", "COLUMNS": "200"}

        def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
            return a.nsexec(str(VENV_BIN / "sage-llm"), *args, check=False, env=client_env, timeout=timeout)

        yield {"a": a, "b": b, "cli": cli, "tmp": tmp_path, "head": c.head}


def _record(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "client" / "engines" / f"{name}.json").read_text())


def _nothing_left(engine_id: str, node_state: Path, shm_before: set[str]) -> None:
    _wait(lambda: not _engine_pids(engine_id), 30, f"every process of engine {engine_id} to be gone")
    assert not any(Path("/tmp").glob(f"sage-llm-{engine_id}*"))
    assert not (node_state / "engines" / f"{engine_id}.json").exists()
    from sage_llm.engine import process

    def left() -> set[str]:  # new files nobody holds (other engines of this machine hold theirs while they run)
        held = {Path(p).name for p in process.held_shm_paths()}
        return {f for f in set(os.listdir("/dev/shm")) - shm_before if f not in held}

    # /dev/shm is the machine's: another program's semaphore (`sem.mp-*`) may exist for a moment between its creation
    # and its unlink. What the engine left stays: waited for, a leak still fails
    _wait(lambda: not left(), 15, f"no new unheld file in /dev/shm (left: {sorted(left())})")


def test_real_engine_on_node_b_chat_from_a_then_stop_ray_stop_and_raylet_kill(netns_cluster, tiny_model):
    cli, b, tmp, head = netns_cluster["cli"], netns_cluster["b"], netns_cluster["tmp"], netns_cluster["head"]
    node_state = tmp / "node-b"
    shm_before = set(os.listdir("/dev/shm"))
    start = ("start", tiny_model, "--cluster", head, "--node", "node_b", "--enforce-eager", "--max-model-len", "512",
             "--timeout", "400")

    # 1. start, chat from node A, stop: nothing left
    r = cli(*start, "--name", "t1")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = _record(tmp, "t1")
    assert rec["cluster"]["node_ip"] == b.ip
    assert rec["host"] == b.ip
    assert _engine_pids(rec["id"])
    r = cli("chat", "t1", "-p", "Say hello", "--plain", "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert TINY_REPLY in r.stdout
    r = cli("status", "t1", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    view = json.loads(r.stdout)["engines"][0]
    assert view["state"] == "ready"
    assert view["cluster"]["node_address"] == b.ip
    assert f":{rec['port']} " in b.nsexec("ss", "-ltnH").stdout
    r = cli("stop", "t1")
    assert r.returncode == 0, r.stderr[-2000:]
    _nothing_left(rec["id"], node_state, shm_before)
    assert f":{rec['port']} " not in b.nsexec("ss", "-ltnH").stdout  # its port is free on node B

    # 2. `ray stop --force` on B leaves the engine running (its own session); the agent's restart sweeps it
    r = cli(*start, "--name", "t2")
    assert r.returncode == 0, r.stderr[-2000:]
    rec2 = _record(tmp, "t2")
    b.nsexec(str(VENV_BIN / "ray"), "stop", "--force")
    time.sleep(2)
    assert _engine_pids(rec2["id"]), "Ray's own stop was expected to leave the engine running"
    r = cli("status", "t2", "--json")
    view = json.loads(r.stdout)["engines"][0]
    assert view["state"] in ("failed", "unhealthy"), view
    b.ray_start()  # node B back: the first agent placed there sweeps the orphan before it launches its engine
    r = cli("start", tiny_model, "--cluster", head, "--node", "node_b", "--name", "t3", "--no-wait",
            "--enforce-eager", "--max-model-len", "512")
    assert r.returncode == 0, r.stderr[-2000:]
    rec3 = _record(tmp, "t3")
    _nothing_left(rec2["id"], node_state, shm_before | set(os.listdir("/dev/shm")))
    r = cli("stop", "t2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("stop", "t3")
    assert r.returncode == 0, r.stderr[-2000:]
    _nothing_left(rec3["id"], node_state, shm_before)

    # 3. SIGKILL of B's raylet: the head declares the node dead; status says so; the engine is swept on B's return
    r = cli(*start, "--name", "t4")
    assert r.returncode == 0, r.stderr[-2000:]
    rec4 = _record(tmp, "t4")
    os.kill(b.raylet_pid(), signal.SIGKILL)

    def dead() -> bool:
        doc = json.loads(cli("status", "t4", "--json").stdout)
        return doc["engines"][0]["state"] == "failed" and "is dead" in (doc["engines"][0]["error"] or "")

    t0 = time.monotonic()
    _wait(dead, 90, "the head to report node B dead")
    detected_s = time.monotonic() - t0
    r = cli("stop", "t4")
    assert r.returncode == 0, r.stderr[-2000:]
    b.nsexec(str(VENV_BIN / "ray"), "stop", "--force", check=False)
    b.ray_start()
    r = cli("start", tiny_model, "--cluster", head, "--node", "node_b", "--name", "t5", "--no-wait",
            "--enforce-eager", "--max-model-len", "512")
    assert r.returncode == 0, r.stderr[-2000:]
    _nothing_left(rec4["id"], node_state, shm_before | set(os.listdir("/dev/shm")))
    r = cli("stop", "t5")
    assert r.returncode == 0, r.stderr[-2000:]
    print(f"node death detected in {detected_s:.1f} s")



CHAT = """
import sys
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused", timeout=600, max_retries=0)
r = client.chat.completions.with_raw_response.create(model=sys.argv[2], temperature=0, max_tokens=32,
                                                     messages=[{"role": "user", "content": "Say hello"}])
print(r.headers.get("x-sage-llm-engine"))
print(r.parse().choices[0].message.content)
"""

GET = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())
"""


def test_gateway_on_a_loads_a_real_engine_on_node_b_on_demand_then_stop_leaves_nothing(netns_cluster, tiny_model):
    """`gateway start --cluster` on node A, the tiny model pinned to node B (`node = "node_b"`): the first chat
    request (the openai client, on A) loads a real CPU vLLM on B through the agent, the answer comes through the
    gateway, /api/engines shows the engine on B, and `gateway stop` on A leaves nothing on B."""
    cli, a, b, tmp, head = (netns_cluster[k] for k in ("cli", "a", "b", "tmp", "head"))
    node_state = tmp / "node-b"
    shm_before = set(os.listdir("/dev/shm"))
    home = tmp / "client"
    home.mkdir(exist_ok=True)
    config = home / "llm.toml"
    config.write_text(f'[gateway.models."{tiny_model}"]\nnode = "node_b"\n'
                      'args = ["--enforce-eager", "--max-model-len", "512"]\n')
    py = str(VENV_BIN / "python")
    env = {**a.env, "SAGE_LLM_HOME": str(home), "SAGE_LLM_CONFIG": str(config)}
    t0 = time.monotonic()
    r = a.nsexec(str(VENV_BIN / "sage-llm"), "gateway", "start", "--cluster", head, "--port", "8901", "--ttl", "0",
                 "--no-fallback", "--no-external", check=False, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    try:
        r = a.nsexec(py, "-c", CHAT, "http://127.0.0.1:8901/v1", tiny_model, check=False, env=env, timeout=700)
        assert r.returncode == 0, r.stderr[-3000:]
        engine, reply = r.stdout.splitlines()[:2]
        served_s = time.monotonic() - t0
        assert TINY_REPLY in reply
        views = json.loads(a.nsexec(py, "-c", GET, "http://127.0.0.1:8901/api/engines", env=env).stdout)
        view = next(e for e in views["engines"] if e["name"] == engine)
        assert view["node"] == b.ip, view
        assert view["managed_by_gateway"] is True, view
        rec = json.loads((home / "engines" / f"{engine}.json").read_text())
        assert _engine_pids(rec["id"]), "the engine's processes run on node B"
        assert f":{view['port']} " in b.nsexec("ss", "-ltnH").stdout  # it listens on node B
    finally:
        stop = a.nsexec(str(VENV_BIN / "sage-llm"), "gateway", "stop", check=False, env=env, timeout=300)
    assert stop.returncode == 0, stop.stderr[-2000:]
    _nothing_left(rec["id"], node_state, shm_before)
    assert f":{view['port']} " not in b.nsexec("ss", "-ltnH").stdout
    print(f"gateway start to the first answer from node B: {served_s:.1f} s; "
          f"the whole test to nothing left: {time.monotonic() - t0:.1f} s")


def test_gateway_replaces_the_replica_of_a_killed_node_on_another_node(tmp_path):
    """Issue 23, faults, in the namespace tier with Ray's default health checks (fake engines of fixed capacity: no
    vLLM needed). A gateway with --cluster on node A runs a model as 2 replicas (nodes B, C, D have one logical GPU
    each). Under load (16 streaming clients), the node of one replica is killed (every process at once): no request
    fails before its first byte (each is retried on the other replica), and two replicas serve again, neither on
    the dead node, within a generous deadline (the engine loads in 0.3 s; bench/bench_cluster.py times it)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.conftest import FAKE_VLLM

    why = netns.missing()
    if why:
        skip_or_fail(why)
    key = {KEY_ENV: secrets.token_urlsafe(24), "SAGE_LLM_VLLM": f"{netns.VENV_BIN / 'python'} {FAKE_VLLM}",
           "FAKE_VLLM_LOAD_S": "0.3", "FAKE_VLLM_TOKEN_DELAY_S": "0.01", "FAKE_VLLM_REPLY": " ".join(["tok"] * 32)}
    envs = [{"SAGE_LLM_NODE_STATE_DIR": str(tmp_path / f"node-{x}"), **key} for x in "abcd"]
    args = [["--num-cpus", "1", "--num-gpus", "0"]] + [["--num-cpus", "1", "--num-gpus", "1"]] * 3
    home = tmp_path / "home"
    home.mkdir()
    (home / "llm.toml").write_text('[gateway.models."org/rep"]\nreplicas = 2\nargs = ["--max-num-seqs", "4"]\n')
    with netns.ray_cluster(4, node_env=envs, node_args=args) as c:
        a = c.nodes[0]
        opts = {"host": "127.0.0.1", "port": 8901, "ttl": 0, "external": False, "fallback": False, "cluster": c.head}
        env = {**a.env, "SAGE_LLM_HOME": str(home), "SAGE_LLM_CONFIG": str(home / "llm.toml")}
        with open(home / "gateway.log", "wb") as log:
            gw = a.popen([str(VENV_BIN / "python"), "-m", "sage_llm.gateway", "--options", json.dumps(opts)], env=env,
                         stdout=log, stderr=log)
        try:
            with a.netns(), httpx.Client(base_url="http://127.0.0.1:8901", timeout=60) as http:
                chat = {"model": "org/rep", "messages": [{"role": "user", "content": "hi"}]}

                def answers() -> bool:
                    with contextlib.suppress(httpx.TransportError):  # not listening yet
                        return http.post("/v1/chat/completions", json=chat).status_code == 200
                    return False

                def serving() -> dict[str, str]:
                    """engine -> node of the ready replicas"""
                    with contextlib.suppress(httpx.HTTPError):
                        card = next(m for m in http.get("/v1/models").json()["data"] if m["id"] == "org/rep")
                        ready = {r["engine"] for r in card.get("replicas", []) if r["state"] == "ready"}
                        return {e["name"]: e["node"] for e in http.get("/api/engines").json()["engines"]
                                if e["name"] in ready}
                    return {}

                _wait(answers, 120, "a first answer")
                before = _wait(lambda: (lambda s: s if len(s) == 2 else None)(serving()), 120, "two replicas")
                assert len(set(before.values())) == 2, before  # on distinct nodes
                stop = threading.Event()
                failed_before_first_byte: list[str] = []

                def client(i: int) -> int:
                    """Streams requests until told to stop; records those that failed before any data frame."""
                    n = 0
                    while not stop.is_set():
                        n += 1
                        frames, outcome = 0, "no [DONE]"
                        try:
                            with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True},
                                             headers={"x-session-id": f"c{i}-{n}"}) as r:
                                for line in r.iter_lines():
                                    if line.startswith("data: [DONE]"):
                                        outcome = "ok"
                                    elif '"error"' in line:
                                        outcome = f"error event: {line[:200]}"
                                        break
                                    elif line.startswith("data:"):
                                        frames += 1
                                if r.status_code != 200:
                                    outcome = f"status {r.status_code}"
                        except httpx.HTTPError as exc:
                            outcome = f"{type(exc).__name__}: {exc}"
                        if outcome != "ok" and frames == 0:
                            failed_before_first_byte.append(outcome)
                    return n

                with ThreadPoolExecutor(16) as pool:  # threads made here: in A's network namespace too
                    load = [pool.submit(client, i) for i in range(16)]
                    _wait(lambda: all(f.running() for f in load), 30, "the clients")
                    victim = next(n for n in c.nodes if n.ip == sorted(before.items())[-1][1])
                    victim.kill()
                    t0 = time.monotonic()
                    try:
                        _wait(lambda: (lambda s: len(s) == 2 and victim.ip not in s.values())(serving()), 120,
                              f"two replicas serving again, none on the killed {victim.name}")
                    finally:
                        stop.set()
                        total = sum(f.result() for f in load)
                print(f"replaced {time.monotonic() - t0:.1f} s after the kill of {victim.name}; {total} requests")
                assert failed_before_first_byte == [], failed_before_first_byte[:5]
        finally:
            gw.stop()
