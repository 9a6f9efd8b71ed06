"""Process identity: only processes of our engine's session, created after it, carrying its id, are ever ours."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from sage_llm.engine import process
from tests.support.discipline import wait_for

SLEEPER = "import time, os, sys\nwhile True: time.sleep(1)"
FORKER = ("import subprocess, sys, time\n"
          "subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)'])\n"
          "while True: time.sleep(1)")


def _spawn(code: str, engine_id: str, tmp_path) -> process.Spawned:
    env = dict(os.environ, SAGE_LLM_ENGINE_ID=engine_id)
    return process.spawn([sys.executable, "-c", code], env, tmp_path / "x.log")


def _wait_children(pid: int, n: int, timeout: float = 30.0) -> list[psutil.Process]:
    def kids() -> list[psutil.Process]:
        found = psutil.Process(pid).children(recursive=True)
        return found if len(found) >= n else []
    return wait_for(kids, timeout, what=f"{n} child process(es) of {pid}")


def test_spawn_is_a_new_session_with_private_log(tmp_path):
    s = _spawn(SLEEPER, "e1", tmp_path)
    try:
        assert os.getsid(s.pid) == s.pid
        assert os.getpgid(s.pid) == s.pid
        assert oct(os.stat(tmp_path / "x.log").st_mode & 0o777) == "0o600"
        tree = process.find_tree(s.pid, s.create_time, "e1")
        assert tree.leader is not None
        assert [p.pid for p in tree.members] == [s.pid]
    finally:
        os.killpg(s.pid, signal.SIGKILL)
        s.popen.wait()


def test_wrong_create_time_is_never_ours(tmp_path):
    s = _spawn(SLEEPER, "e1", tmp_path)
    try:
        tree = process.find_tree(s.pid, s.create_time - 100, "e1")
        assert tree.leader is None
        assert tree.members == []
        result = process.stop_tree(s.pid, s.create_time - 100, "e1", timeout=0.2)
        assert result.signalled == []
        assert psutil.Process(s.pid).is_running()
    finally:
        os.killpg(s.pid, signal.SIGKILL)
        s.popen.wait()


def test_other_engine_id_is_never_ours(tmp_path):
    s = _spawn(FORKER, "engine-A", tmp_path)
    try:
        _wait_children(s.pid, 1)
        tree = process.find_tree(s.pid, s.create_time, "engine-B")
        assert tree.leader is not None  # the leader is identified by pid + create time
        assert len(tree.members) == 1, "the child carrying another engine id must not be counted"
    finally:
        os.killpg(s.pid, signal.SIGKILL)
        s.popen.wait()


def test_orphans_are_found_and_stopped_after_leader_dies(tmp_path):
    s = _spawn(FORKER, "e1", tmp_path)
    kids = _wait_children(s.pid, 1)
    os.kill(s.pid, signal.SIGKILL)
    s.popen.wait()
    tree = process.find_tree(s.pid, s.create_time, "e1")
    assert tree.leader is None
    assert [p.pid for p in tree.members] == [kids[0].pid]
    result = process.stop_tree(s.pid, s.create_time, "e1", timeout=2)
    assert result.survivors == []
    assert not psutil.pid_exists(kids[0].pid) or psutil.Process(kids[0].pid).status() == psutil.STATUS_ZOMBIE


def test_sigterm_ignored_escalates_to_sigkill(tmp_path):
    code = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ignoring', flush=True)\n"
            "while True: time.sleep(1)")
    s = _spawn(code, "e1", tmp_path)
    wait_for(lambda: "ignoring" in (tmp_path / "x.log").read_text(), 30, what="the child to ignore SIGTERM")
    escalated = []
    result = process.stop_tree(s.pid, s.create_time, "e1", timeout=0.5, on_escalate=lambda: escalated.append(1))
    s.popen.wait(timeout=5)
    assert result.escalated
    assert escalated == [1]
    assert result.survivors == []


def test_unrelated_process_is_untouched_by_stop(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
    try:
        ctime = psutil.Process(other.pid).create_time()
        # a record that claims the same pid but an older create time (pid reuse): nothing may be signalled
        result = process.stop_tree(other.pid, ctime - 50, None, timeout=0.2)
        assert result.signalled == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_port_is_free_and_taken():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert not process.port_is_free("127.0.0.1", port)
    assert process.port_is_free("127.0.0.1", port)


@pytest.mark.parametrize("field", ["pid", "create_time"])
def test_missing_identity_finds_nothing(field):
    kwargs = {"pid": os.getpid(), "create_time": psutil.Process().create_time()}
    kwargs[field] = None
    assert process.find_tree(kwargs["pid"], kwargs["create_time"], None).members == []
