"""Processes of an engine: spawn detached, recognise ours, stop the whole tree.

Identity rule. An engine is started with `start_new_session=True`, so its PID is also its session and process-group
id, and every process vLLM forks (`VLLM::EngineCore`, `VLLM::Worker_*`) inherits that session. A process belongs to
an engine when:
  * its session id is the recorded PID, and
  * it was created at or after the recorded create time, and
  * if the recorded PID is alive with another create time (PID reused), it was created before that new process, and
  * where its environment is readable, it carries SAGE_LLM_ENGINE_ID=<the record's id>.
Nothing else is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sage_llm.config import EnvVars

CREATE_TIME_TOLERANCE = 0.05


@dataclass
class Spawned:
    pid: int
    create_time: float
    popen: subprocess.Popen


def spawn(argv: list[str], env: dict[str, str], log_file: Path, cwd: str | None = None) -> Spawned:
    """Start `argv` in a new session with stdout+stderr appended to `log_file` (0600)."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    try:
        ctime = psutil.Process(popen.pid).create_time()
    except psutil.Error:
        ctime = time.time()
    return Spawned(popen.pid, ctime, popen)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def leader(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The recorded process itself, if it is alive and really the one we started."""
    if not pid or create_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE:
            return None
        return proc if _alive(proc) else None
    except psutil.Error:
        return None


def pid_reused_by(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The unrelated process that now holds the recorded PID, if any."""
    if not pid or create_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE:
            return proc
    except psutil.Error:
        pass
    return None


def _marker(proc: psutil.Process) -> str | bool | None:
    """The engine id in a process's environment; None if unreadable; False if readable and absent."""
    try:
        return proc.environ().get(EnvVars.ENGINE_MARK, False)
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return None


@dataclass
class Tree:
    leader: psutil.Process | None
    members: list[psutil.Process] = field(default_factory=list)  # every live process of the engine, leader first

    @property
    def alive(self) -> bool:
        return bool(self.members)

    @property
    def orphans(self) -> list[psutil.Process]:
        return [p for p in self.members if self.leader is None or p.pid != self.leader.pid]


def find_tree(pid: int | None, create_time: float | None, engine_id: str | None) -> Tree:
    """All live processes of the engine recorded as (pid, create_time, engine_id), by the identity rule above."""
    if not pid or create_time is None:
        return Tree(None, [] if not engine_id else find_by_marker(engine_id))
    lead = leader(pid, create_time)
    reused = None if lead else pid_reused_by(pid, create_time)
    members: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if proc.pid == pid and lead is None:
                continue
            if os.getsid(proc.pid) != pid:
                continue
            ctime = proc.info["create_time"]
            if ctime is None or ctime + CREATE_TIME_TOLERANCE < create_time:
                continue
            if reused is not None and ctime >= reused.create_time():
                continue
            if not _alive(proc):
                continue
            mark = _marker(proc)
            if engine_id and mark is not None and mark != engine_id:
                continue
            members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error, OSError):
            continue
    members.sort(key=lambda p: (lead is None or p.pid != lead.pid, p.pid))
    return Tree(lead, members)


def find_by_marker(engine_id: str) -> list[psutil.Process]:
    """Processes carrying our engine id (used when a CLI died between spawn and recording the PID)."""
    found = []
    me = os.getuid()
    for proc in psutil.process_iter(["pid", "uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != me:
                continue
            if _marker(proc) == engine_id and _alive(proc):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            proc.send_signal(sig)


@dataclass
class StopResult:
    signalled: list[int]
    survivors: list[tuple[int, str]]  # (pid, name) still alive after SIGKILL
    escalated: bool  # SIGKILL was needed
    duration_s: float


def stop_tree(
    pid: int | None,
    create_time: float | None,
    engine_id: str | None,
    timeout: float,
    force: bool = False,
    on_escalate: Callable[[], None] | None = None,
    poll: float = 0.05,
) -> StopResult:
    """SIGTERM the engine's processes, wait `timeout`, SIGKILL what is left, and confirm nothing survives.

    Only processes that pass the identity rule are signalled; the tree is re-read on every round so a process that
    forks late is caught too.
    """
    started = time.monotonic()
    tree = find_tree(pid, create_time, engine_id)
    signalled = {p.pid for p in tree.members}
    escalated = False
    if tree.members and not force:
        # SIGTERM to the API server lets vLLM shut its children down cleanly; orphans (no leader) get it directly.
        _signal_all([tree.leader] if tree.leader else tree.members, signal.SIGTERM)
        deadline = started + timeout
        sent_to_all = tree.leader is None
        while time.monotonic() < deadline:
            tree = find_tree(pid, create_time, engine_id)
            if not tree.members:
                break
            if tree.leader is None and not sent_to_all:
                # the leader is gone but children linger: give them SIGTERM as well
                _signal_all(tree.members, signal.SIGTERM)
                signalled |= {p.pid for p in tree.members}
                sent_to_all = True
            time.sleep(poll)
    tree = find_tree(pid, create_time, engine_id)
    if tree.members:
        escalated = not force
        if on_escalate and not force:
            on_escalate()
        for _round in range(3):
            signalled |= {p.pid for p in tree.members}
            _signal_all(tree.members, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                tree = find_tree(pid, create_time, engine_id)
                if not tree.members:
                    break
                time.sleep(poll)
            if not tree.members:
                break
    survivors = []
    for proc in tree.members:
        with contextlib.suppress(psutil.Error):
            survivors.append((proc.pid, proc.name()))
    return StopResult(sorted(signalled), survivors, escalated, time.monotonic() - started)


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on or holds `host:port` (a bind test, like vLLM's own)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "" if host in ("0.0.0.0", "") else host.strip("[]")
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((bind_host, port))
        except OSError:
            return False
    if host not in ("127.0.0.1", "localhost", "0.0.0.0", "", "::", "::1"):
        return True
    # something bound to another address but listening on loopback still makes the port useless to us
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def port_owner(port: int) -> tuple[int | None, str | None]:
    """(pid, process name) listening on `port`, when the OS lets us see it."""
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid:
                    try:
                        return conn.pid, psutil.Process(conn.pid).name()
                    except psutil.Error:
                        return conn.pid, None
                return None, None
    except (psutil.AccessDenied, PermissionError):
        pass
    return None, None
