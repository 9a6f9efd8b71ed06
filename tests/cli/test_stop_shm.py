"""`stop` sweeps the engine's leftover /dev/shm files, and says so (fake vLLM, real /dev/shm)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.usefixtures("fake_vllm", "stop_all"),
              pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")]


def free_port(lo: int = 19600, hi: int = 19660) -> int:
    """A free port in this suite's range (the Ray test takes 19660-19699)."""
    import random
    import socket

    ports = list(range(lo, hi))
    random.shuffle(ports)
    for p in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return p
    raise RuntimeError("no free port")


def test_stop_removes_unheld_leftovers_of_the_engine(cli):
    port = free_port()
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
