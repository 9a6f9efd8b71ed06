"""`start` without --port skips ports that other programs reserved with a lock file and have not bound yet (test
sessions side by side: tests/support/ports.py), takes those its own session reserved, and holds the lock of the port it
took for the engine's life (engine/portlocks.py). A private lock directory here, so no other session interferes."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from tests.support.ports import free_port


def _hold(lock_dir: Path, port: int, owner: str) -> int:
    fd = os.open(lock_dir / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, owner.encode(), 0)
    return fd


def _held(lock_dir: Path, port: int) -> bool:
    fd = os.open(lock_dir / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


@pytest.mark.usefixtures("stop_all")
def test_start_skips_ports_other_sessions_hold(cli, fake_vllm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = free_port(span=4)  # free and reserved against other sessions in the shared directory
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    monkeypatch.setenv("SAGE_LLM_PORT_LOCK_DIR", str(lock_dir))
    monkeypatch.setenv("SAGE_LLM_PORT_LOCK_OWNER", "this-session")
    monkeypatch.setenv("SAGE_LOCAL_ENGINE_PORT", str(base))
    fds = [_hold(lock_dir, base, "this-session"),  # reserved by this session: start may take it
           _hold(lock_dir, base + 1, "another-session 123"),  # picked by another session, not bound yet
           _hold(lock_dir, base + 2, "")]  # bench/ and older holders write no owner
    try:
        for name in ("a", "b"):
            code, _out, err = cli("start", "org/m", "--name", name)
            assert code == 0, err
        code, out, _err = cli("status", "--json")
        ports = {e["name"]: e["port"] for e in json.loads(out)["engines"] if e["managed"]}
        assert ports == {"a": base, "b": base + 3}
        # the engine holds the lock of the port start took by itself, for its life
        assert _held(lock_dir, base + 3)
        assert (lock_dir / f"{base + 3}.lock").read_text() == "this-session"
        assert cli("stop", "b")[0] == 0
        assert not _held(lock_dir, base + 3)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.usefixtures("stop_all")
def test_an_explicit_port_ignores_the_locks(cli, fake_vllm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    monkeypatch.setenv("SAGE_LLM_PORT_LOCK_DIR", str(lock_dir))
    fd = _hold(lock_dir, port, "another-session")
    try:
        code, _out, err = cli("start", "org/m", "--name", "a", "--port", str(port))
        assert code == 0, err  # the user's choice: checked for being free, not for reservations
    finally:
        os.close(fd)
