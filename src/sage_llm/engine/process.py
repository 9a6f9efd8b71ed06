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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_llm.config import EnvVars

CREATE_TIME_TOLERANCE = 0.05

if TYPE_CHECKING:
    import psutil


def _ps() -> Any:
    """psutil, imported on first use: `status --json` reads /proc itself and never needs it."""
    import psutil

    return psutil


class Proc:
    """A process identified from /proc (pid, create time, name). Signals re-check its identity through psutil first,
    so a PID that died and was reused in between is never signalled."""

    __slots__ = ("_name", "create_time", "pid")

    def __init__(self, pid: int, create_time: float, name: str) -> None:
        self.pid = pid
        self.create_time = create_time
        self._name = name

    def __repr__(self) -> str:
        return f"Proc(pid={self.pid}, name={self._name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Proc) and other.pid == self.pid and other.create_time == self.create_time

    def __hash__(self) -> int:
        return hash((self.pid, self.create_time))

    def name(self) -> str:
        if len(self._name) >= 15:  # the kernel keeps 15 characters ("VLLM::EngineCor"): complete it like psutil
            cmd = self.cmdline()
            if cmd:
                full = os.path.basename(cmd[0]).strip()
                if full.startswith(self._name):
                    self._name = full
        return self._name

    def environ(self) -> dict[str, str]:
        """The process's environment; raises PermissionError when unreadable, ProcessLookupError when gone."""
        try:
            with open(f"/proc/{self.pid}/environ", "rb") as fh:
                raw = fh.read()
        except FileNotFoundError as exc:
            raise ProcessLookupError(self.pid) from exc
        # psutil's rule: stop at the first empty item. setproctitle (vLLM's EngineCore and workers) overwrites the
        # block with the title and zeros, and whatever follows the first NUL pair is leftover, not environment
        env = {}
        for item in raw.split(b"\0"):
            if not item:
                break
            key, sep, value = item.partition(b"=")
            if sep and key:
                env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        return env

    def cmdline(self) -> list[str]:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            return []
        return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]

    def psutil(self) -> psutil.Process | None:
        """The psutil handle, only if this is still the same process (same create time) and not a zombie."""
        ps = _ps()
        try:
            proc = ps.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > CREATE_TIME_TOLERANCE:
                return None
            return proc if proc.status() != ps.STATUS_ZOMBIE else None
        except ps.Error:
            return None

    def is_running(self) -> bool:
        return self.psutil() is not None

    def send_signal(self, sig: int) -> None:
        proc = self.psutil()
        if proc is None:
            raise ProcessLookupError(self.pid)
        proc.send_signal(sig)


@dataclass
class Spawned:
    pid: int
    create_time: float
    popen: Any  # subprocess.Popen


def spawn(argv: list[str], env: dict[str, str], log_file: Path, cwd: str | None = None) -> Spawned:
    """Start `argv` in a new session with stdout+stderr appended to `log_file` (0600)."""
    import subprocess

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
    ps = _ps()
    try:
        ctime = ps.Process(popen.pid).create_time()
    except ps.Error:
        ctime = time.time()
    return Spawned(popen.pid, ctime, popen)


def _alive(proc: Any) -> bool:
    ps = _ps()
    try:
        return bool(proc.is_running() and proc.status() != ps.STATUS_ZOMBIE)
    except ps.Error:
        return False


def leader(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The recorded process itself, if it is alive and really the one we started."""
    if not pid or create_time is None:
        return None
    ps = _ps()
    try:
        proc = ps.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE:
            return None
        return proc if _alive(proc) else None
    except ps.Error:
        return None


def pid_reused_by(pid: int | None, create_time: float | None, table: dict[int, ProcInfo] | None = None
                  ) -> Any | None:
    """The unrelated process that now holds the recorded PID, if any (from `table` when given)."""
    if not pid or create_time is None:
        return None
    if table is not None:
        info = table.get(pid)
        if info is not None and abs(info.create_time - create_time) > CREATE_TIME_TOLERANCE:
            return Proc(info.pid, info.create_time, info.name)
        return None
    ps = _ps()
    try:
        proc = ps.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE:
            return proc
    except ps.Error:
        pass
    return None


def _marker(proc: Any) -> str | bool | None:
    """The engine id in a process's environment; None if unreadable; False if readable and absent.

    vLLM renames EngineCore and its workers with setproctitle, which overwrites the environment block: their
    /proc/PID/environ reads back empty. An empty environment is therefore "unknown" (None), not "absent".
    """
    try:
        env = proc.environ()
    except Exception:  # PermissionError, ProcessLookupError, psutil.AccessDenied / ZombieProcess / NoSuchProcess
        return None
    if not env:
        return None
    return env.get(EnvVars.ENGINE_MARK, False)


@dataclass
class Tree:
    leader: Any | None  # Proc (or psutil.Process from find_by_marker)
    members: list[Any] = field(default_factory=list)  # every live process of the engine, leader first

    @property
    def alive(self) -> bool:
        return bool(self.members)

    @property
    def orphans(self) -> list[Any]:
        return [p for p in self.members if self.leader is None or p.pid != self.leader.pid]


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    sid: int
    create_time: float
    state: str
    name: str

    def cmdline(self) -> list[str]:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            return []
        return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


_BOOT: list[float] = []


def _boot_time() -> float:
    """System boot time as psutil computes it (the `btime` line of /proc/stat), so create times agree with psutil."""
    if not _BOOT:
        with open("/proc/stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"btime"):
                    _BOOT.append(float(line.split()[1]))
                    break
        if not _BOOT:
            _BOOT.append(_ps().boot_time())
    return _BOOT[0]


def proc_table() -> dict[int, ProcInfo]:
    """One cheap pass over /proc: pid, ppid, session, create time (as psutil computes it), state, name."""
    table: dict[int, ProcInfo] = {}
    try:
        boot = _boot_time()
        ticks = os.sysconf("SC_CLK_TCK")
        entries = os.listdir("/proc")
    except (OSError, ValueError):
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        rpar = data.rfind(b")")
        fields = data[rpar + 2:].split()
        try:
            table[int(entry)] = ProcInfo(
                pid=int(entry), ppid=int(fields[1]), sid=int(fields[3]),
                create_time=int(fields[19]) / ticks + boot, state=fields[0].decode(),
                name=data[data.find(b"(") + 1: rpar].decode("utf-8", "replace"),
            )
        except (IndexError, ValueError):
            continue
    return table


def find_tree(pid: int | None, create_time: float | None, engine_id: str | None,
              table: dict[int, ProcInfo] | None = None) -> Tree:
    """All live processes of the engine recorded as (pid, create_time, engine_id), by the identity rule above."""
    if not pid or create_time is None:
        return Tree(None, [] if not engine_id else find_by_marker(engine_id))
    if table is None:
        table = proc_table()
    lead = None
    reused_ctime = None
    info = table.get(pid)
    if info is not None:
        if abs(info.create_time - create_time) <= CREATE_TIME_TOLERANCE:
            if info.state not in ("Z", "X"):
                lead = Proc(info.pid, info.create_time, info.name)
        else:
            reused_ctime = info.create_time
    members: list[Any] = []
    for p in table.values():
        if p.sid != pid or p.state in ("Z", "X"):
            continue
        if p.pid == pid:
            if lead is not None:
                members.append(lead)
            continue
        if p.create_time + CREATE_TIME_TOLERANCE < create_time:
            continue
        if reused_ctime is not None and p.create_time >= reused_ctime:
            continue
        proc = Proc(p.pid, p.create_time, p.name)
        mark = _marker(proc)
        if engine_id and mark is not None and mark != engine_id:
            continue
        members.append(proc)
    members.sort(key=lambda p: (lead is None or p.pid != lead.pid, p.pid))
    return Tree(lead, members)


def _as_process(pid: int) -> Any | None:
    ps = _ps()
    try:
        return ps.Process(pid)
    except ps.Error:
        return None


def find_by_marker(engine_id: str) -> list[Any]:
    """Processes carrying our engine id (used when a CLI died between spawn and recording the PID)."""
    ps = _ps()
    found = []
    me = os.getuid()
    for proc in ps.process_iter(["pid", "uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != me:
                continue
            if _marker(proc) == engine_id and _alive(proc):
                found.append(proc)
        except ps.Error:
            continue
    # EngineCore and its workers carry no readable marker (setproctitle wiped their environ): take them through the
    # session of a marked session leader (the API server we spawned with start_new_session)
    leaders = set()
    for proc in found:
        with contextlib.suppress(OSError):
            if os.getsid(proc.pid) == proc.pid:
                leaders.add(proc.pid)
    if leaders:
        known = {p.pid for p in found}
        for info in proc_table().values():
            if info.sid not in leaders or info.pid in known or info.state in ("Z", "X"):
                continue
            proc = _as_process(info.pid)
            if proc is not None and _marker(proc) in (None, engine_id):
                found.append(proc)
    return found


def _signal_all(procs: list[Any], sig: int) -> None:
    ps = _ps()
    for proc in procs:
        with contextlib.suppress(ps.Error, ProcessLookupError, PermissionError):
            proc.send_signal(sig)


@dataclass
class StopResult:
    signalled: list[int]
    survivors: list[tuple[int, str]]  # (pid, name) still alive after SIGKILL
    escalated: bool  # SIGKILL was needed
    duration_s: float
    shm_seen: set[str] = field(default_factory=set)  # /dev/shm files the engine's processes held before the signals


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
    # what the engine holds in /dev/shm while it is alive: the proof that a leftover file is its own (sweep_shm)
    seen = held_shm_paths(None, signalled) if signalled else set()
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
        seen |= held_shm_paths(None, {p.pid for p in tree.members})
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
    ps = _ps()
    for proc in tree.members:
        with contextlib.suppress(ps.Error):
            survivors.append((proc.pid, proc.name()))
    return StopResult(sorted(signalled), survivors, escalated, time.monotonic() - started, seen)


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on or holds `host:port` (a bind test, like vLLM's own)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "" if host in ("0.0.0.0", "") else host.strip("[]")
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # like the engine itself (uvicorn sets SO_REUSEADDR): a TIME_WAIT leftover does not make a port busy
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    psutil = _ps()
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


# vLLM's shared-memory files (CPU all-reduce between ranks; Python shared_memory message queues) outlive its processes
SHM_DIR = "/dev/shm"


def _is_vllm_shm(name: str) -> bool:
    """vLLM's names: Python shared_memory segments (`psm_<random hex>`, message queues), CPU all-reduce files."""
    return name.startswith("psm_") or "cpushm" in name


def _named_for_port(name: str, port: int | None) -> bool:
    """vLLM's CPU all-reduce files named after the engine's port (`<port>-tp:0-[0-1]-cpushm_0`)."""
    return port is not None and name.startswith(f"{port}-") and "cpushm" in name


def held_shm_paths(shm_dir: str | None = None, pids: set[int] | None = None) -> set[str]:
    """Every file under `shm_dir` (SHM_DIR) that a live process (only those in `pids`, when given) has open or mapped
    (/proc/PID/fd and /proc/PID/maps)."""
    held: set[str] = set()
    prefix = (shm_dir or SHM_DIR).rstrip("/") + "/"
    for pid in (sorted(str(p) for p in pids) if pids is not None else os.listdir("/proc")):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(prefix):
                        held.add(target.removesuffix(" (deleted)"))
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                i = line.find(prefix)
                if i >= 0:
                    held.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
    return held


def sweep_shm(since: float | None, port: int | None = None, shm_dir: str | None = None,
              owned: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Remove the stopped engine's shared-memory leftovers that no live process holds now; their names.

    A file is the engine's only when that can be shown: its processes were seen holding it before they were stopped
    (`owned`: full paths, from `StopResult.shm_seen`), or it is a CPU all-reduce file named after the engine's port.
    `psm_*` names are random, so an unheld `psm_*` of another program, even one created while the engine ran, is left
    alone; so is everything of an engine that died before `stop` could see what it held. Only the user's own regular
    files with vLLM's names, not older than the engine (`since`, epoch s), are candidates, and a file some live
    process has open or mapped now is never touched.
    """
    shm_dir = shm_dir or SHM_DIR
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return []
    me = os.getuid()
    candidates = []
    for name in entries:
        path = os.path.join(shm_dir, name)
        if not _is_vllm_shm(name) or not (path in owned or _named_for_port(name, port)):
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != me or not os.path.isfile(path) or (since is not None and st.st_mtime < since - 2.0):
            continue
        candidates.append(path)
    if not candidates:
        return []
    held = held_shm_paths(shm_dir)
    removed = []
    for path in candidates:
        if path in held:
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(os.path.basename(path))
    return sorted(removed)
