"""Ports for tests: the one place that hands them out.

Every test that needs a port on 127.0.0.1 (to bind a fake or real server, or as an address nothing listens on) takes
it from `free_port()` (or `port_range()` for a block handed whole to a program). Two rules make a port it returns
safe to use for the rest of the test:

* Fixed windows below the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by
  default): the kernel never hands these out as the source port of an outgoing connection, so a port found free
  stays free until the test binds it (a real vLLM binds its port only after ~25 s of loading).
* A lock file per port, `$TMPDIR/sage-llm-test-ports/<port>.lock`, held with flock(2) until the end of the test:
  several pytest sessions (and `bench/`, which uses the same directory) run on this machine at once, and a port
  that one of them has picked but not yet bound looks free to the others. A lock dies with its process, so a killed
  session frees its ports; no stale files to clean. sage-llm's own choice of port (`start` without --port) reads the
  same locks (SAGE_LLM_PORT_LOCK_DIR, set by the root conftest): it skips ports other sessions hold, takes those
  whose lock names this session (OWNER), and holds the lock of a port it takes for the engine's life.

Windows (they do not overlap; the bench/ window is bench/_common.py's, with the same lock files):

    real         19000-19099  real vLLM engines of the integration tier (one engine, one port)
    fake         19100-19499  everything else: fake engines, the fake hub, fake servers, "nothing listens here"
    (literals)   19500-19599  values in records, settings and config files that no test binds: never handed out
    ray          19600-19689  the Ray head's ports of the scale-out test
    ray-workers  19690-19699  handed whole to Ray as its worker port range (`port_range`)
    (bench)      19700-19999  bench/_common.py: free_port

Ports are released by the root conftest's autouse fixture when the test ends (`release_all`), after every other
fixture of the test has been torn down. A window with no free port left skips the test, and fails it under CI
(`skip_or_fail`): it means other sessions hold them all, not that the code is wrong.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
from pathlib import Path

WINDOWS: dict[str, range] = {
    "real": range(19000, 19100),
    "fake": range(19100, 19500),
    "ray": range(19600, 19690),
    "ray-workers": range(19690, 19700),
}
LOCK_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "sage-llm-test-ports"
# this session's token in the lock files it holds; the root conftest gives it to sage-llm (SAGE_LLM_PORT_LOCK_OWNER,
# with SAGE_LLM_PORT_LOCK_DIR), whose own choice of port then skips ports other sessions hold (engine/portlocks.py)
OWNER = f"sage-llm-tests {os.getpid()}"

_held: dict[int, int] = {}  # port -> fd of its lock file, held by this process until release_all()


def _lock(port: int) -> bool:
    """Take the lock of `port` without waiting; False when another session (or this one) holds it."""
    if port in _held:
        return False
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, OWNER.encode(), 0)  # `start` (engine/portlocks.py) takes a port whose lock names its own session
    _held[port] = fd
    return True


def _unlock(port: int) -> None:
    fd = _held.pop(port, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _is_free(port: int) -> bool:
    from sage_llm.engine import process

    return process.port_is_free("127.0.0.1", port)


def free_port(window: str = "fake", span: int = 1) -> int:
    """A port of `window` that nothing listens on and no other test session holds, reserved until the test ends.
    With `span` > 1, ports port..port+span-1 are all free and reserved (a rolling switch takes the next port)."""
    ports = WINDOWS[window]
    starts = list(range(ports.start, ports.stop - span + 1))
    random.shuffle(starts)
    for start in starts:
        taken: list[int] = []
        for port in range(start, start + span):
            if not _lock(port):
                break
            taken.append(port)
            if not _is_free(port):
                break
        else:
            return start
        for port in taken:
            _unlock(port)
    from tests.support.discipline import skip_or_fail

    skip_or_fail(f"no {span} free port(s) in the {window!r} test window {ports.start}-{ports.stop - 1}: other test "
                 f"sessions hold them (see {LOCK_DIR})")
    raise AssertionError("unreachable")  # pragma: no cover


def port_range(window: str) -> range:
    """All the ports of `window`, reserved together (for a program that picks among them itself, like Ray's
    workers); skips the test (fails it under CI) when any of them is held or in use."""
    ports = WINDOWS[window]
    taken: list[int] = []
    for port in ports:
        locked = _lock(port)
        if locked:
            taken.append(port)
        if not (locked and _is_free(port)):
            for p in taken:
                _unlock(p)
            from tests.support.discipline import skip_or_fail

            skip_or_fail(f"the {window!r} test window {ports.start}-{ports.stop - 1} is in use: port {port}")
    return ports


def release_all() -> None:
    """Release every port this process reserved (the root conftest calls it when each test ends)."""
    for port in list(_held):
        _unlock(port)
