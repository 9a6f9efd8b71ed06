"""Identity by start ticks + boot id (issue 12, §2): immune to clock steps, re-checked before any signal."""

from __future__ import annotations

import os
import signal
import sys

import psutil
import pytest

from sage_llm.engine import process


@pytest.fixture
def sleeper(tmp_path):
    s = process.spawn([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"],
                      dict(os.environ, SAGE_LLM_ENGINE_ID="e1"), tmp_path / "x.log")
    yield s
    os.killpg(s.pid, signal.SIGKILL)
    s.popen.wait()


def test_spawn_records_start_ticks_of_proc_stat_and_the_boot_id(sleeper):
    with open(f"/proc/{sleeper.pid}/stat", "rb") as fh:
        field22 = int(fh.read().rsplit(b")", 1)[1].split()[19])
    assert sleeper.ticks == field22
    with open("/proc/sys/kernel/random/boot_id") as fh:
        assert sleeper.boot_id == fh.read().strip()
    with open("/proc/uptime") as fh:  # counted from boot (a monotonic clock), so at most the uptime
        assert 0 < sleeper.ticks / os.sysconf("SC_CLK_TCK") <= float(fh.read().split()[0])


def test_clock_step_changes_nothing_for_a_recorded_birth(sleeper, monkeypatch):
    birth = sleeper.birth
    monkeypatch.setattr(process, "_BOOT", [process._boot_time() + 3600.0])  # the wall clock jumped an hour
    assert process.leader(sleeper.pid, birth) is not None
    assert process.pid_reused_by(sleeper.pid, birth) is None
    assert [p.pid for p in process.find_tree(sleeper.pid, birth, "e1").members] == [sleeper.pid]
    # the wall-clock create time alone (what records of sage-llm 0.1.0 hold) is fooled by the same step
    assert process.leader(sleeper.pid, sleeper.create_time) is None


def test_another_boot_id_makes_the_pid_not_ours(sleeper):
    birth = process.Birth(sleeper.ticks, "00000000-0000-4000-8000-000000000000", sleeper.create_time)
    assert process.leader(sleeper.pid, birth) is None
    assert process.pid_reused_by(sleeper.pid, birth) is not None
    assert process.find_tree(sleeper.pid, birth, "e1").members == []
    assert process.stop_tree(sleeper.pid, birth, "e1", timeout=0.2).signalled == []
    assert psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE


def test_signals_recheck_the_start_ticks_first(sleeper):
    info = process.read_stat(sleeper.pid)
    assert info is not None
    stale = process.Proc(info.pid, info.create_time, info.name, info.ticks - 1)  # the PID, another process's start
    with pytest.raises(ProcessLookupError):
        stale.send_signal(signal.SIGKILL)
    assert psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE
    assert process.Proc.of(info).is_running()
