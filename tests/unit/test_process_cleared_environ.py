"""vLLM renames EngineCore and its workers with setproctitle, which wipes /proc/PID/environ. Such a process must
still count as the engine's once the API server is gone (the orphan case), or `stop` would leave it running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sage_llm.engine import process

# the leader starts a child with the given environment, prints the child's pid, then waits
LEADER = (
    "import json, subprocess, sys, time\n"
    "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], env=json.loads(sys.argv[1]))\n"
    "print(c.pid, flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.mark.parametrize(
    ("child_env", "counted"),
    [({}, True), ({"SAGE_LLM_ENGINE_ID": "e1"}, True), ({"SAGE_LLM_ENGINE_ID": "other"}, False)],
    ids=["environ-wiped-by-setproctitle", "same-engine", "another-engine"],
)
def test_orphans_of_a_killed_leader(child_env: dict[str, str], counted: bool):
    import json

    env = {**os.environ, "SAGE_LLM_ENGINE_ID": "e1"}
    leader = subprocess.Popen([sys.executable, "-c", LEADER, json.dumps(child_env)], env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert leader.stdout is not None
        child_pid = int(leader.stdout.readline())
        ctime = psutil.Process(leader.pid).create_time()
        deadline = time.monotonic() + 5  # the child may still be between fork and exec: wait for its own environ
        while psutil.Process(child_pid).environ() != child_env and time.monotonic() < deadline:
            time.sleep(0.02)
        assert psutil.Process(child_pid).environ() == child_env
        leader.send_signal(signal.SIGKILL)
        leader.wait()
        tree = process.find_tree(leader.pid, ctime, "e1")
        assert tree.leader is None
        assert [p.pid for p in tree.members] == ([child_pid] if counted else [])
        result = process.stop_tree(leader.pid, ctime, "e1", timeout=5.0)
        assert result.survivors == []
        assert (child_pid in result.signalled) is counted
        if counted:
            deadline = time.monotonic() + 5
            while psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        else:
            assert psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE  # not ours: never signalled
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.stdout.close()


def test_find_by_marker_takes_the_wiped_children_of_a_marked_leader():
    """No PID recorded (the CLI died right after spawning): the marked API server leads to its EngineCore/Worker."""
    import json

    env = {**os.environ, "SAGE_LLM_ENGINE_ID": "e2"}
    leader = subprocess.Popen([sys.executable, "-c", LEADER, json.dumps({})], env=env, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert leader.stdout is not None
        child_pid = int(leader.stdout.readline())
        assert sorted(p.pid for p in process.find_by_marker("e2")) == sorted([leader.pid, child_pid])
        assert process.find_by_marker("e3") == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        leader.stdout.close()
