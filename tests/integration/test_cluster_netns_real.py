"""`start --cluster` with the real CPU vLLM on a two-node Ray cluster, each node in a network + PID namespace of this
test's own (veth 10.231.0.1 <-> 10.231.0.2; Ray's `ray stop` walks every process it can see, so each node gets its
own PID namespace and /proc). The engine runs on node B; the CLI runs on node A.

Network rules: the test subnet is blackholed in the root namespace first (a mistaken packet cannot leave the
machine) and the route is removed at cleanup; traffic stays on the veth pair. Needs root, `ip`, `unshare`, `nsenter`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_REPLY, engine_dir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SUBNET = "10.231.0.0/24"
A_IP, B_IP = "10.231.0.1", "10.231.0.2"
HEAD = f"{A_IP}:6379"


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, **kw)


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


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Node:
    """One Ray node: `unshare --pid --fork --mount-proc` inside a network namespace; its pid 1 is a `sleep`, so
    `ray stop` and a dead raylet leave the namespace (and what Ray forgot in it) alive until teardown."""

    def __init__(self, netns: str, ip: str, tmp: Path, env: dict[str, str], args: list[str]) -> None:
        self.netns, self.ip, self.tmp, self.env, self.args = netns, ip, tmp, env, args
        self.temp_dir = f"/tmp/rt{os.getpid() % 10000}{netns[-1]}"  # Ray's socket paths must stay short
        self.proc: subprocess.Popen | None = None

    def boot(self) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--mount-proc",
                                      "--kill-child", "sleep", "infinity"], env=self.env)
        _wait(lambda: self.init_pid() is not None, 10, f"{self.netns} pid namespace")
        self.ray_start()

    def init_pid(self) -> int | None:
        """The namespace's pid 1 (the `sleep`), seen from the root namespace."""
        if self.proc is None:
            return None
        out = _run("pgrep", "-P", str(self.proc.pid), check=False).stdout.split()
        return int(out[0]) if out else None

    def nsexec(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run("nsenter", "-t", str(self.init_pid()), "-p", "-m", "-n", "--", *cmd, check=check, env=self.env,
                    timeout=timeout)

    def ray_start(self) -> None:
        self.nsexec(str(VENV_BIN / "ray"), "start", "--node-ip-address", self.ip, "--temp-dir", self.temp_dir,
                    "--num-cpus", "1", "--disable-usage-stats", "--min-worker-port", "24300",
                    "--max-worker-port", "24399", *self.args)

    def raylet_pid(self) -> int | None:
        out = _run("pgrep", "-f", f"raylet.*{self.temp_dir}", check=False).stdout.split()
        return int(out[0]) if out else None

    def down(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)  # unshare --kill-child: the namespace's pid 1 goes, so does all in it
            self.proc.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def netns_cluster(tmp_path, _tiny_cache):
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "unshare", "nsenter", "pgrep")):
        pytest.skip("needs root with ip, unshare, nsenter and pgrep (network + PID namespaces)")
    tag = f"sl{os.getpid() % 100000}"
    nsa, nsb = f"{tag}a", f"{tag}b"
    cleanup: list[list[str]] = []
    nodes: list[Node] = []
    try:
        _run("ip", "route", "add", "blackhole", SUBNET)
        cleanup.append(["ip", "route", "del", "blackhole", SUBNET])
        for ns in (nsa, nsb):
            _run("ip", "netns", "add", ns)
            cleanup.append(["ip", "netns", "del", ns])
        _run("ip", "link", "add", f"{tag}va", "netns", nsa, "type", "veth", "peer", "name", f"{tag}vb", "netns", nsb)
        for ns, dev, ip in ((nsa, f"{tag}va", A_IP), (nsb, f"{tag}vb", B_IP)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SAGE_LLM_VLLM"))}
        base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
        env_a = {**base, "SAGE_LLM_NODE_STATE_DIR": str(tmp_path / "node-a")}
        env_b = {**base, "SAGE_LLM_NODE_STATE_DIR": str(tmp_path / "node-b"), "HF_HUB_OFFLINE": "1",
                 "HF_HUB_CACHE": str(_tiny_cache), "SAGE_LLM_VLLM": str(engine_dir() / "bin" / "vllm")}
        a = Node(nsa, A_IP, tmp_path, env_a, ["--head", "--port", "6379", "--include-dashboard", "false",
                                              "--resources", '{"node_a": 1}'])
        nodes.append(a)
        a.boot()
        b = Node(nsb, B_IP, tmp_path, env_b, ["--address", HEAD, "--resources", '{"node_b": 1}'])
        nodes.append(b)
        b.boot()
        client_env = {**base, "SAGE_LLM_HOME": str(tmp_path / "client"), "NO_COLOR": "1", "COLUMNS": "200"}

        def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
            return _run("ip", "netns", "exec", nsa, str(VENV_BIN / "sage-llm"), *args, check=False, env=client_env,
                        timeout=timeout)

        yield {"a": a, "b": b, "cli": cli, "tmp": tmp_path}
    finally:
        for node in reversed(nodes):
            node.down()
        for cmd in reversed(cleanup):
            _run(*cmd, check=False)


def _record(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "client" / "engines" / f"{name}.json").read_text())


def _nothing_left(engine_id: str, node_state: Path, shm_before: set[str]) -> None:
    _wait(lambda: not _engine_pids(engine_id), 30, f"every process of engine {engine_id} to be gone")
    assert not any(Path("/tmp").glob(f"sage-llm-{engine_id}*"))
    assert not (node_state / "engines" / f"{engine_id}.json").exists()
    from sage_llm.engine import process

    # new files nobody holds (other engines of this machine hold theirs while they run)
    held = {Path(p).name for p in process.held_shm_paths()}
    assert {f for f in set(os.listdir("/dev/shm")) - shm_before if f not in held} == set()


def test_real_engine_on_node_b_chat_from_a_then_stop_ray_stop_and_raylet_kill(netns_cluster, tiny_model):
    cli, b, tmp = netns_cluster["cli"], netns_cluster["b"], netns_cluster["tmp"]
    node_state = tmp / "node-b"
    shm_before = set(os.listdir("/dev/shm"))
    start = ("start", tiny_model, "--cluster", HEAD, "--node", "node_b", "--enforce-eager", "--max-model-len", "512",
             "--timeout", "400")

    # 1. start, chat from node A, stop: nothing left
    r = cli(*start, "--name", "t1")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = _record(tmp, "t1")
    assert rec["cluster"]["node_ip"] == B_IP
    assert rec["host"] == B_IP
    assert _engine_pids(rec["id"])
    r = cli("chat", "t1", "-p", "Say hello", "--plain", "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert TINY_REPLY in r.stdout
    r = cli("status", "t1", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    view = json.loads(r.stdout)["engines"][0]
    assert view["state"] == "ready"
    assert view["cluster"]["node_address"] == B_IP
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
    r = cli("start", tiny_model, "--cluster", HEAD, "--node", "node_b", "--name", "t3", "--no-wait",
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
    r = cli("start", tiny_model, "--cluster", HEAD, "--node", "node_b", "--name", "t5", "--no-wait",
            "--enforce-eager", "--max-model-len", "512")
    assert r.returncode == 0, r.stderr[-2000:]
    _nothing_left(rec4["id"], node_state, shm_before | set(os.listdir("/dev/shm")))
    r = cli("stop", "t5")
    assert r.returncode == 0, r.stderr[-2000:]
    print(f"node death detected in {detected_s:.1f} s")

