"""One gateway per state directory: `gateway.lock` there, flock()ed for the gateway's whole life.

Two gateways on one state directory would both adopt, stop and evict the same engines and fight over `gateway.json`.
The lock is an fcntl.flock on an open file (released by the kernel when the process dies, even by SIGKILL: no stale
lock to clean up); the file holds the holder's pid and port so the refusal can name them.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from sage_llm.core.errors import UsageError

LOCK_FILE = "gateway.lock"


class InstanceLock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1


def hold(port: int) -> InstanceLock:
    """Take the state directory's gateway lock, or refuse (UsageError, exit 2) naming the gateway that holds it."""
    import fcntl

    from sage_llm.core import paths

    root = paths.home()
    paths.ensure_home(root)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        os.close(fd)
        raise UsageError(f"another gateway (pid {holder.get('pid', '?')}, port {holder.get('port', '?')}) is running "
                         f"on the state directory {root}",
                         hint="use that one (`sage-llm gateway status`), stop it (`sage-llm gateway stop`), or give "
                              "this one its own state directory (SAGE_LLM_HOME)") from None
    os.fchmod(fd, 0o600)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "port": port}).encode(), 0)
    return InstanceLock(fd)
