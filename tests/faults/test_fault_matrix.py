"""The fault matrix of docs/reliability.md, each fault injected for real against the fake vLLM.

Every case checks: nothing that is not ours was signalled (the autouse `sentinel`), no process of the engine's tree is
left after stop, the record on disk is consistent, and the user sees one clear line.
Cases 1-6, 10 and 13 live in tests/e2e/test_lifecycle_fake.py; the real-vLLM versions in tests/integration/.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.conftest import FAKE_VLLM
from tests.support.discipline import wait_for
from tests.support.ports import free_port

SAGE_LLM = str(Path(sys.executable).parent / "sage-llm")


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"SAGE_LLM_HOME": str(home), "SAGE_LLM_VLLM": f"{sys.executable} {FAKE_VLLM}",
                "FAKE_VLLM_LOAD_S": "0.3", "NO_COLOR": "1"})
    env.update(extra)
    return env


def run(home: Path, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([SAGE_LLM, *args], env=env_for(home, **extra), capture_output=True, text=True,
                          timeout=timeout)


def marked_processes(home: Path) -> list[psutil.Process]:
    """Live processes started for engines of this state directory (by the fake's command line)."""
    out = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            env = p.info["environ"] or {}
            if env.get("SAGE_LLM_HOME") == str(home) and "SAGE_LLM_ENGINE_ID" in env \
                    and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def status(home: Path) -> dict:
    r = run(home, "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def managed(doc: dict) -> list[dict]:
    return [e for e in doc["engines"] if e["managed"]]


def test_07_ten_concurrent_starts_make_exactly_one_engine(home):
    port = free_port()
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: run(home, "start", "race/model", "--name", "racer", "--port", str(port)),
                                range(10)))
    try:
        codes = [r.returncode for r in results]
        assert codes.count(0) == 10, [(r.returncode, r.stderr[-300:]) for r in results]
        started = [r for r in results if "ready" in r.stdout and "already" not in r.stdout]
        already = [r for r in results if "already serves" in r.stdout]
        assert len(started) == 1
        assert len(already) == 9
        engines = managed(status(home))
        assert len(engines) == 1
        assert engines[0]["state"] == "ready"
        leaders = [p for p in marked_processes(home) if p.ppid() == 1 or os.getsid(p.pid) == p.pid]
        assert len(leaders) == 1
    finally:
        run(home, "stop", "--all")
    assert marked_processes(home) == []


def test_08_storm_of_mixed_commands(home):
    ports = {n: free_port() for n in ("s1", "s2", "s3")}
    rng = random.Random(8)

    def one(i: int) -> tuple[str, int, str]:
        name = rng.choice(list(ports))
        op = rng.choice(["start", "start", "stop", "status", "status-json"])
        if op == "start":
            r = run(home, "start", f"storm/{name}", "--name", name, "--port", str(ports[name]))
        elif op == "stop":
            r = run(home, "stop", name)
        elif op == "status":
            r = run(home, "status", name)
        else:
            r = run(home, "status", "--json")
        return op, r.returncode, r.stderr

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(50)))
    try:
        for op, code, err in results:
            assert "Traceback" not in err, err
            if op == "start":
                assert code in (0, 1), err  # 1: the engine was being stopped by a racing stop (said so)
            elif op == "stop":
                assert code in (0, 2), err  # 2: not recorded (already stopped by another stop)
            elif op == "status":
                assert code in (0, 3), err
            else:
                assert code == 0, err
            if code not in (0, 3):
                assert [ln for ln in err.splitlines() if ln.startswith("Error: ")], err
        # the final state matches reality: every record is a live, ready engine, and every live engine is recorded
        # (once the processes of the last stops have exited: they are signalled, not waited for, by a stop that lost)
        seen: list = []

        def settled() -> bool:
            recorded = {e["name"]: e for e in managed(status(home))}
            live_ids = set()
            for p in marked_processes(home):
                live_ids.add(p.environ().get("SAGE_LLM_ENGINE_ID"))
            rec_ids = {json.loads((home / "engines" / f"{n}.json").read_text())["id"] for n in recorded
                       if recorded[n]["state"] == "ready"}
            seen[:] = [recorded, live_ids, rec_ids]
            return live_ids == rec_ids

        wait_for(settled, 30, interval=0.2, what=lambda: f"live engines = ready records: {seen}")
        for e in seen[0].values():
            assert e["state"] in ("ready", "failed"), e
            if e["state"] == "failed":
                assert e["processes"] == [], e  # a failed record holds no process
    finally:
        run(home, "stop", "--all")
    assert marked_processes(home) == []


def test_09_cli_killed_mid_start_leaves_a_manageable_engine(home):
    port = free_port()
    proc = subprocess.Popen([SAGE_LLM, "start", "slow/model", "--name", "slow", "--port", str(port)],
                            env=env_for(home, FAKE_VLLM_LOAD_S="3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    record = home / "engines" / "slow.json"

    def spawned() -> bool:  # mid-start: the engine is spawned and recorded, still loading (3 s)
        try:
            return bool(json.loads(record.read_text()).get("pid"))
        except (OSError, ValueError):
            return False

    wait_for(spawned, 30, what="the engine of `start` to be spawned and recorded")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    doc = status(home)
    e = next(e for e in doc["engines"] if e["name"] == "slow")
    assert e["state"] in ("starting", "ready")
    wait_for(lambda: next(e for e in status(home)["engines"] if e["name"] == "slow")["state"] == "ready", 30,
             interval=0.3, what="the engine to become ready without its CLI")
    r = run(home, "stop", "slow")
    assert r.returncode == 0, r.stderr
    assert marked_processes(home) == []
    assert not (home / "engines" / "slow.json").exists()


def test_11_unwritable_state_dir_is_one_clear_line(tmp_path):
    home = Path("/proc/sage-llm-fault/home")
    r = run(home, "start", "org/x", "--port", str(free_port()))
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("Error: cannot create state directory")
    assert "Traceback" not in r.stderr
    assert marked_processes(home) == []


def test_11_full_disk_while_recording_spawns_nothing(home, monkeypatch, cli, fake_vllm):
    import errno

    from sage_llm.core import state

    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state.os, "write", full)
    code, out, err = cli("start", "org/full", "--port", str(free_port()))
    monkeypatch.setattr(state.os, "write", real_write)
    assert code == 1
    assert "disk is full" in err
    assert not (home / "engines" / "full.json").exists()
    assert marked_processes(home) == []


def test_14_engine_environment_missing(home, monkeypatch, cli):
    monkeypatch.setenv("PATH", "/nonexistent")
    code, out, err = cli("start", "org/x", "--port", str(free_port()))
    assert code == 1
    assert "sage-llm engine install" in err
    assert len(err.strip().splitlines()) == 1
    assert not (home / "engines" / "x.json").exists()


def test_14_engine_environment_broken(home, monkeypatch, cli):
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    (home / "engine-env.json").write_text(json.dumps({
        "kind": "cpu", "path": "/gone/venv", "python": "/gone/venv/bin/python", "vllm": ["/gone/venv/bin/vllm"]}))
    code, out, err = cli("start", "org/x", "--port", str(free_port()))
    assert code == 1
    assert "missing or broken" in err
    assert "sage-llm engine install" in err
    code, out, err = cli("engine", "show")
    assert code == 1
    assert "missing or broken" in out


def test_14_sage_llm_vllm_points_nowhere(home, monkeypatch, cli):
    monkeypatch.setenv("SAGE_LLM_VLLM", "/no/such/vllm")
    code, out, err = cli("start", "org/x", "--port", str(free_port()))
    assert code == 1
    assert "SAGE_LLM_VLLM" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_engine_killed_by_someone_else_is_reported_then_cleaned(home, sig):
    port = free_port()
    r = run(home, "start", "victim/m", "--name", "victim", "--port", str(port), FAKE_VLLM_CHILDREN="1")
    assert r.returncode == 0, r.stderr
    e = next(e for e in status(home)["engines"] if e["name"] == "victim")
    leader = psutil.Process(e["pid"])
    os.kill(e["pid"], sig)
    if sig == signal.SIGTERM:  # a clean shutdown: the whole engine exits
        wait_for(lambda: marked_processes(home) == [], 30, what="the engine to shut down on SIGTERM")
    else:  # the leader dies at once; its children are left running
        wait_for(lambda: not leader.is_running() or leader.status() == psutil.STATUS_ZOMBIE, 30,
                 what="the killed leader to exit")
    e = next(e for e in status(home)["engines"] if e["name"] == "victim")
    if sig == signal.SIGTERM:
        assert e["state"] == "stopped"  # a clean shutdown by someone else
        assert "not by `sage-llm stop`" in e["error"]
    else:
        assert e["state"] == "failed"
        assert "left" in e["error"]
    r = run(home, "stop", "victim")
    assert r.returncode == 0, r.stderr
    assert marked_processes(home) == []
