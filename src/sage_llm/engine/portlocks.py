"""Ports reserved by other programs that run beside us: lock files in the directory SAGE_LLM_PORT_LOCK_DIR.

Test suites (tests/support/ports.py) and benchmarks run side by side on one machine hold a lock file `<port>.lock`
(flock(2)) on every port they picked and may not have bound yet: a real vLLM binds its port only after its load. When
the directory is set, `start`'s own choice of port (no --port) skips a port whose lock another program holds, and
holds the lock of the port it chose for as long as the engine lives (the engine inherits it; it dies with the
engine). A lock file holds its owner's token: one that says SAGE_LLM_PORT_LOCK_OWNER is ours (a test's reserved
ports), and its port is ours to take. Without the directory nothing of this runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

DIR_VAR = "SAGE_LLM_PORT_LOCK_DIR"
OWNER_VAR = "SAGE_LLM_PORT_LOCK_OWNER"


@dataclass
class Claim:
    usable: bool  # nobody else holds the port's lock
    fd: int | None = None  # the lock we took, to hand to the engine (None: no directory, or our owner holds it)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def claim(port: int) -> Claim:
    """Take `port`'s lock for the engine about to be started on it, or say that someone else holds it."""
    where = os.environ.get(DIR_VAR, "").strip()
    if not where:
        return Claim(True)
    path = Path(where) / f"{port}.lock"
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # another user's lock file, an unusable directory: not ours to take
        return Claim(path.exists() is False)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.environ.get(OWNER_VAR, "").strip()
        try:
            held_by = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            held_by = ""
        os.close(fd)
        return Claim(bool(owner) and held_by == owner)
    token = os.environ.get(OWNER_VAR, "").strip() or f"sage-llm {os.getpid()}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, token.encode(), 0)
    return Claim(True, fd)
