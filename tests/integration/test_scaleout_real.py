"""Scale-out against the real CPU build of vLLM and the tiny model: tensor parallel 2 from start to stop, and a
loopback-only Ray head against which `start --ray-address` reaches vLLM's CPU error and reports it clearly.

Ports: the engines' from the "real" window, the Ray head's from the "ray" and "ray-workers" windows
(tests/support/ports.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from sage_llm.core.state import EngineRecord, StateStore
from sage_llm.engine import process, ray_cluster
from tests.support.discipline import skip_or_fail
from tests.support.ports import free_port, port_range
from tests.support.tiny import TINY_REPLY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

def engine_procs(rec: EngineRecord) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            mine = rec.pid is not None and os.getsid(proc.pid) == rec.pid
            if not mine:
                with contextlib.suppress(psutil.AccessDenied):
                    mine = proc.environ().get("SAGE_LLM_ENGINE_ID") == rec.id
            if mine:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def shm_names() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


@pytest.mark.usefixtures("stop_all")
def test_tensor_parallel_2_on_the_cpu_engine(cli, real_vllm, tiny_model):
    port = free_port("real")
    shm_before = shm_names()
    code, out, err = cli("start", tiny_model, "--name", "tp2", "--port", str(port), "-tp", "2", "--enforce-eager",
                         "--max-model-len", "256", "--timeout", "360", "--json")
    assert code == 0, err
    rec = StateStore().load("tp2")
    assert isinstance(rec, EngineRecord)
    assert rec.settings["tensor_parallel_size"] == 2
    assert rec.env["VLLM_CPU_OMP_THREADS_BIND"]  # set for the user, who did not
    assert rec.argv[rec.argv.index("--tensor-parallel-size") + 1] == "2"
    titles = [" ".join(p.cmdline()) for p in engine_procs(rec)]
    assert any("Worker_TP0" in t for t in titles), titles
    assert any("Worker_TP1" in t for t in titles), titles
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                   json={"model": tiny_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip() == TINY_REPLY
    mine = {n for n in shm_names() - shm_before if n.startswith(f"{port}-") or "cpushm" in n or n.startswith("psm_")}
    code, out, err = cli("stop", "tp2", "--json")
    assert code == 0, err
    doc = json.loads(out)["stopped"][0]
    assert doc["stopped"] is True
    assert engine_procs(rec) == []
    assert process.find_by_marker(rec.id) == []
    # vLLM's shared-memory files of this engine are gone; any new one left is held by some other live process
    left = (shm_names() - shm_before) & mine
    held = process.held_shm_paths("/dev/shm")
    assert all(f"/dev/shm/{n}" in held for n in left), (left, mine)
    assert not any(n.startswith(f"{port}-") for n in shm_names())


@pytest.fixture
def ray_head(real_vllm) -> Iterator[dict]:
    """A Ray head on loopback only, in its own session (so the test can end exactly it), ports in 19600-19699."""
    engine_bin = Path(real_vllm).parent
    if not (engine_bin / "ray").exists():
        skip_or_fail("Ray is not installed in the engine environment: `make engine` installs it (engine install --ray)")
    gcs = free_port("ray")
    extra = [free_port("ray") for _ in range(8)]
    workers = port_range("ray-workers")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    argv = [str(engine_bin / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(gcs), "--node-manager-port", str(extra[0]), "--object-manager-port", str(extra[1]),
            "--ray-client-server-port", str(extra[2]), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(extra[3]), "--dashboard-agent-listen-port", str(extra[4]),
            "--dashboard-agent-grpc-port", str(extra[5]), "--runtime-env-agent-port", str(extra[6]),
            "--metrics-export-port", str(extra[7]), "--min-worker-port", str(workers.start),
            "--max-worker-port", str(workers.stop - 1),
            "--num-cpus", "1", "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats",
            "--temp-dir", temp]
    log = open(Path(temp) / "head.log", "wb")
    head = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{gcs}"
    python = str(engine_bin / "python")
    try:
        deadline = time.monotonic() + 120
        data: dict = {}
        while time.monotonic() < deadline:
            assert head.poll() is None, (Path(temp) / "head.log").read_text()[-2000:]
            data = ray_cluster.query(address, python, timeout=10)
            if any(n.get("alive") for n in data.get("nodes", [])):
                break
            time.sleep(1)
        else:
            pytest.fail(f"Ray head did not come up: {data}")
        yield {"address": address, "python": python, "pgid": head.pid}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)  # Ray drains for up to 30 s on SIGTERM; nothing to keep here
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def cluster_pids(pgid: int) -> set[int]:
    out = set()
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
    return out


@pytest.mark.usefixtures("stop_all")
def test_ray_address_on_the_cpu_build_is_diagnosed_and_leaves_the_cluster_alone(cli, real_vllm, tiny_model, ray_head):
    address = ray_head["address"]
    before = cluster_pids(ray_head["pgid"])
    assert len(before) >= 3  # gcs_server, raylet, and friends
    port = free_port("real")
    code, _out, err = cli("start", tiny_model, "--name", "onray", "--port", str(port), "--ray-address", address,
                          "--enforce-eager", "--max-model-len", "256", "--timeout", "300")
    assert code == 1, err
    assert "Ray serving needs GPU nodes" in err
    assert "current platform cpu does not support ray" in err
    assert "--ray-address" in err  # the hint: drop it, or use GPU nodes
    rec = StateStore().load("onray")
    assert isinstance(rec, EngineRecord)
    assert rec.settings["ray_address"] == address
    assert rec.env["RAY_ADDRESS"] == address
    assert rec.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert rec.argv[rec.argv.index("--distributed-executor-backend") + 1] == "ray"
    assert engine_procs(rec) == []  # nothing of the engine is left running
    # the cluster is untouched: the same processes, the node alive, and no actor of the engine alive
    assert before <= cluster_pids(ray_head["pgid"])
    data = ray_cluster.query(address, ray_head["python"])
    assert [n["alive"] for n in data["nodes"]] == [True]
    jobs = ray_cluster.engine_jobs(data, rec)
    assert jobs, data["jobs"]  # vLLM did connect to the cluster as a driver
    assert not [a for a in data["actors"] if a["job_id"] in jobs and a["state"] != "DEAD"]
    # status shows the Ray address and the failure; stop removes the record and leaves the cluster running
    code, out, _err = cli("status", "--json")
    eng = next(e for e in json.loads(out)["engines"] if e["name"] == "onray")
    assert eng["state"] == "failed"
    assert eng["ray"]["address"] == address
    assert "GPU nodes" in eng["error"]
    code, out, err = cli("stop", "onray")
    assert code == 0, err
    assert StateStore().load("onray") is None
    assert before <= cluster_pids(ray_head["pgid"])
