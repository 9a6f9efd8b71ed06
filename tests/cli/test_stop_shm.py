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
