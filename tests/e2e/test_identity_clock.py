"""Engine identity survives wall-clock steps and does not survive a reboot (issue 12, §2).

A process is recognised by its start in clock ticks since boot (/proc/PID/stat field 22) and the kernel boot id.
A wall-clock create time derived from the boot time moves when the clock is stepped (NTP, suspend/resume): the kernel
reports btime = now - uptime, so after a step every create time computed from it shifts by the step.
"""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from sage_llm.engine import process
from tests.conftest import free_port
from tests.e2e.test_lifecycle_fake import engine, status_doc


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.fixture
def clock_step(monkeypatch: pytest.MonkeyPatch):
    """Step the wall clock by `seconds` as this process sees it: every boot-time source (ours, psutil's) moves."""
    import psutil._pslinux as pslinux

    def step(seconds: float) -> None:
        real = process._boot_time()
        real_ps = pslinux.boot_time()
        monkeypatch.setattr(process, "_BOOT", [real + seconds])
        monkeypatch.setattr(pslinux, "boot_time", lambda: real_ps + seconds)
        monkeypatch.setattr(psutil, "boot_time", lambda: real_ps + seconds)

    return step


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_CHILDREN", "1")  # a stand-in for EngineCore, in the engine's session


def _start(cli, home, name: str) -> dict:
    code, _out, err = cli("start", "org/Tiny-Chat", "--name", name, "--port", str(free_port()))
    assert code == 0, err
    return json.loads((home / "engines" / f"{name}.json").read_text())


@pytest.mark.usefixtures("fake_vllm", "stop_all", "children")
@pytest.mark.parametrize("step_s", [300.0, -300.0])
def test_clock_step_keeps_the_live_engine_ours_and_stop_signals_it(cli, home, clock_step, step_s) -> None:
    rec = _start(cli, home, "stepped")
    with open("/proc/sys/kernel/random/boot_id") as fh:
        assert rec["boot_id"] == fh.read().strip()
    assert isinstance(rec["start_ticks"], int)
    before = engine(status_doc(cli), "stepped")
    pids = [p["pid"] for p in before["processes"]]
    assert len(pids) == 2

    clock_step(step_s)  # the clock jumps by 5 minutes: a create time derived from the boot time shifts with it
    assert abs(process.proc_table()[rec["pid"]].create_time - rec["create_time"]) > 60  # the step took effect

    e = engine(status_doc(cli), "stepped")
    assert e["state"] == "ready", e["error"]
    assert e["error"] is None
    assert [p["pid"] for p in e["processes"]] == pids
    code, out, err = cli("stop", "stepped")
    assert code == 0, err
    assert "stopped 'stepped'" in out  # signalled and stopped, not "was not running"
    assert all(_gone(p) for p in pids)
    assert not (home / "engines" / "stepped.json").exists()


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_record_from_another_boot_is_not_ours(cli, home) -> None:
    rec = _start(cli, home, "rebooted")
    pid = rec["pid"]
    try:
        # the same PID and start ticks, but recorded on another boot: whatever runs there now is not the engine
        rec["boot_id"] = "00000000-0000-4000-8000-000000000000"
        (home / "engines" / "rebooted.json").write_text(json.dumps(rec))
        e = engine(status_doc(cli), "rebooted")
        assert e["state"] in ("failed", "stopped")
        assert "another process" in e["error"]
        assert e["processes"] == []
        code, out, err = cli("stop", "rebooted")
        assert code == 0, err
        assert "was not running" in out
        assert not _gone(pid), "a process of the current boot was signalled for a record of another boot"
    finally:
        if not _gone(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.usefixtures("fake_vllm", "stop_all", "children")
def test_record_of_an_older_sage_llm_without_start_ticks_is_still_stoppable(cli, home) -> None:
    rec = _start(cli, home, "legacy")
    for key in ("start_ticks", "boot_id"):  # what sage-llm 0.1.0 wrote: create_time only, schema_version 1
        del rec[key]
    (home / "engines" / "legacy.json").write_text(json.dumps(rec))
    e = engine(status_doc(cli), "legacy")
    assert e["state"] == "ready", e["error"]
    pids = [p["pid"] for p in e["processes"]]
    assert len(pids) == 2
    code, out, err = cli("stop", "legacy")
    assert code == 0, err
    assert "stopped 'legacy'" in out
    assert all(_gone(p) for p in pids)
