"""`stop` sweeps the engine's leftover /dev/shm files, and says so (fake vLLM, real /dev/shm)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.discipline import skip_or_fail
from tests.support.ports import free_port

pytestmark = pytest.mark.usefixtures("_dev_shm", "fake_vllm", "stop_all")


@pytest.fixture
def _dev_shm() -> None:
    if not os.path.isdir("/dev/shm"):
        skip_or_fail("no /dev/shm on this machine")


def test_stop_removes_unheld_leftovers_of_the_engine(cli):
    port = free_port(span=2)  # port + 1 names another engine's files below
    code, _out, err = cli("start", "org/model-a", "--name", "shm1", "--port", str(port))
    assert code == 0, err
    ours = Path(f"/dev/shm/{port}-tp:0-[0-1]-cpushm_0")  # named after the engine's port, as vLLM's CPU build does
    other = Path(f"/dev/shm/{port + 1}-tp:0-[0-1]-cpushm_0")  # another port: not this engine's
    held = Path(f"/dev/shm/{port}-tp:0-[0-1]-cpushm_1")
    for p in (ours, other, held):
        p.write_bytes(b"\0" * 1024)
    fd = os.open(held, os.O_RDONLY)
    try:
        code, out, err = cli("stop", "shm1", "--json")
        assert code == 0, err
        doc = json.loads(out)["stopped"][0]
        assert doc["shm_removed"] == [ours.name]
        assert doc["notes"] == []
        assert not ours.exists()
        assert other.exists()
        assert held.exists()  # a live process (this one) has it open
    finally:
        os.close(fd)
        for p in (ours, other, held):
            p.unlink(missing_ok=True)


def test_stop_removes_the_engines_psm_files_and_leaves_a_foreign_one(cli, monkeypatch, tmp_path):
    """The engine maps two psm_* files (random names, like vLLM's message queues) and leaves them behind when killed;
    another program's unheld psm_* file, created while the engine runs, survives the stop (the old sweep took it).

    A private directory stands for /dev/shm: on a shared machine, other users' stops must not race this test."""
    from sage_llm.core.state import StateStore
    from sage_llm.engine import process

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(process, "SHM_DIR", str(shm))
    monkeypatch.setenv("FAKE_VLLM_SHM_DIR", str(shm))
    monkeypatch.setenv("FAKE_VLLM_SHM", "2")
    monkeypatch.setenv("FAKE_VLLM_IGNORE_TERM", "1")  # stopped with SIGKILL: nothing of its own is cleaned up
    port = free_port()
    code, _out, err = cli("start", "org/model-a", "--name", "shm2", "--port", str(port))
    assert code == 0, err
    log = Path(StateStore().load("shm2").log_file).read_text()
    engine_files = [shm / line.split("FAKE_SHM ")[1].strip() for line in log.splitlines() if "FAKE_SHM " in line]
    assert len(engine_files) == 2, log
    assert all(p.exists() for p in engine_files)
    foreign = shm / "psm_0f0e1g2n"  # someone else's, unheld, newer than the engine
    foreign.write_bytes(b"\0" * 1024)
    code, out, err = cli("stop", "shm2", "--timeout", "0.5", "--json")
    assert code == 0, err
    doc = json.loads(out)["stopped"][0]
    assert doc["escalated"] is True
    assert sorted(doc["shm_removed"]) == sorted(p.name for p in engine_files)
    assert not any(p.exists() for p in engine_files)
    assert foreign.exists()
