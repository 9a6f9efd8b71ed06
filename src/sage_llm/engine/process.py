"""Processes of an engine: spawn detached, recognise ours, stop the whole tree.

Identity rule. An engine is started with `start_new_session=True`, so its PID is also its session and process-group
id, and every process vLLM forks (`VLLM::EngineCore`, `VLLM::Worker_*`) inherits that session. A process belongs to
an engine when:
  * the machine has not rebooted since the engine started (same kernel boot id), and
  * its session id is the recorded PID, and
  * it started at or after the recorded start, and
  * if the recorded PID is alive with another start (PID reused), it started before that new process, and
  * where its environment is readable, it carries SAGE_LLM_ENGINE_ID=<the record's id>.
Nothing else is ever signalled.

Starts are compared in clock ticks since boot (field 22 of /proc/PID/stat) on the boot named by
/proc/sys/kernel/random/boot_id: neither moves when the wall clock is stepped (NTP, suspend/resume, `date -s`), unlike a
wall-clock create time derived from the boot time. Records written before sage-llm stored ticks carry only that
wall-clock `create_time`; they are matched on it as before (see `Birth`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from sage_llm.core.config import EnvVars
from sage_llm.core.records import Record, field

CREATE_TIME_TOLERANCE = 0.05

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any

    import psutil


def _ps() -> Any:
    """psutil, imported on first use: `status --json` reads /proc itself and never needs it."""
    import psutil

    return psutil


_BOOT_ID: list[str | None] = []


def boot_id() -> str | None:
    """The kernel's id of this boot (a new one every boot; it never changes while the machine runs)."""
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
                _BOOT_ID.append(fh.read().strip() or None)
        except OSError:
            _BOOT_ID.append(None)
    return _BOOT_ID[0]


class Birth(Record, frozen=True):
    """When a process started, as the kernel counts it: `ticks` (clock ticks since boot, /proc/PID/stat field 22) on
    the boot `boot_id`. Records of older sage-llm versions have only `create_time` (psutil's wall-clock create time):
    they are compared on that, within CREATE_TIME_TOLERANCE, as those versions did."""

    ticks: int | None = None
    boot_id: str | None = None
    create_time: float | None = None

    def other_boot(self) -> bool:
        """True when the machine has rebooted since: no process alive now can be this one or its child."""
        now = boot_id()
        return self.boot_id is not None and now is not None and self.boot_id != now

    def same(self, info: ProcInfo) -> bool:
        """`info` is the very process this birth describes."""
        if self.other_boot():
            return False
        if self.ticks is not None:
            return info.ticks == self.ticks
        return self.create_time is not None and abs(info.create_time - self.create_time) <= CREATE_TIME_TOLERANCE

    def not_before(self, info: ProcInfo) -> bool:
        """`info` started at or after this birth (so it can be a child of it)."""
        if self.ticks is not None:
            return info.ticks >= self.ticks
        return self.create_time is not None and info.create_time + CREATE_TIME_TOLERANCE >= self.create_time


def as_birth(born: Birth | float | None) -> Birth | None:
    """A Birth from a Birth, a legacy wall-clock create time, or nothing."""
    if born is None or isinstance(born, Birth):
        return born
    return Birth(create_time=float(born))


def birth_of(rec: Any) -> Birth | None:
    """The recorded start of an engine record's PID (start ticks + boot id; `create_time` alone in old records)."""
    ticks, boot, ctime = getattr(rec, "start_ticks", None), getattr(rec, "boot_id", None), rec.create_time
    if ticks is None and ctime is None:
        return None
    return Birth(ticks, boot, ctime)


class Proc:
    """A process identified from /proc (pid, start ticks, name). Signals re-check its identity (same start ticks) first,
    so a PID that died and was reused in between is never signalled."""

    __slots__ = ("_name", "create_time", "pid", "ticks")

    def __init__(self, pid: int, create_time: float, name: str, ticks: int) -> None:
        self.pid = pid
        self.create_time = create_time  # wall clock, for display only: it moves with clock steps
        self.ticks = ticks
        self._name = name

    @classmethod
    def of(cls, info: ProcInfo) -> Proc:
        return cls(info.pid, info.create_time, info.name, info.ticks)

    def __repr__(self) -> str:
        return f"Proc(pid={self.pid}, name={self._name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Proc) and other.pid == self.pid and other.ticks == self.ticks

    def __hash__(self) -> int:
        return hash((self.pid, self.ticks))

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
        """The psutil handle, only if this is still the same process (same start ticks) and not a zombie."""
        ps = _ps()
        try:
            proc = ps.Process(self.pid)
        except ps.Error:
            return None
        # read after the handle exists: if the PID was reused before or while it was made, the ticks differ
        info = read_stat(self.pid)
        if info is None or info.ticks != self.ticks or info.state in ("Z", "X"):
            return None
        return proc

    def is_running(self) -> bool:
        return self.psutil() is not None

    def send_signal(self, sig: int) -> None:
        proc = self.psutil()
        if proc is None:
            raise ProcessLookupError(self.pid)
        proc.send_signal(sig)


class Spawned(Record):
    pid: int
    create_time: float
    popen: Any  # subprocess.Popen
    ticks: int | None = None  # start in clock ticks since boot (/proc/PID/stat field 22)
    boot_id: str | None = None

    @property
    def birth(self) -> Birth:
        return Birth(self.ticks, self.boot_id, self.create_time)


def spawn(argv: list[str], env: dict[str, str], log_file: Path, cwd: str | None = None,
          keep_fds: tuple[int, ...] = ()) -> Spawned:
    """Start `argv` in a new session with stdout+stderr appended to `log_file` (0600); `keep_fds` stay open in it."""
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
            pass_fds=keep_fds,
        )
    finally:
        os.close(fd)
    ps = _ps()
    try:
        ctime = ps.Process(popen.pid).create_time()
    except ps.Error:
        ctime = time.time()
    info = read_stat(popen.pid)  # our own child: its PID cannot be reused before we wait() for it
    return Spawned(popen.pid, ctime, popen, info.ticks if info else None, boot_id() if info else None)


def _alive(proc: Any) -> bool:
    ps = _ps()
    try:
        return bool(proc.is_running() and proc.status() != ps.STATUS_ZOMBIE)
    except ps.Error:
        return False


def leader(pid: int | None, born: Birth | float | None) -> Proc | None:
    """The recorded process itself, if it is alive and really the one we started."""
    birth = as_birth(born)
    if not pid or birth is None:
        return None
    info = read_stat(pid)
    if info is None or info.state in ("Z", "X") or not birth.same(info):
        return None
    return Proc.of(info)


def pid_reused_by(pid: int | None, born: Birth | float | None, table: dict[int, ProcInfo] | None = None
                  ) -> Proc | None:
    """The unrelated process that now holds the recorded PID, if any (from `table` when given)."""
    birth = as_birth(born)
    if not pid or birth is None:
        return None
    info = table.get(pid) if table is not None else read_stat(pid)
    if info is not None and not birth.same(info):
        return Proc.of(info)
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


class Tree(Record):
    leader: Any | None  # Proc (or psutil.Process from find_by_marker)
    members: list[Any] = field(default_factory=list)  # every live process of the engine, leader first

    @property
    def alive(self) -> bool:
        return bool(self.members)

    @property
    def orphans(self) -> list[Any]:
        return [p for p in self.members if self.leader is None or p.pid != self.leader.pid]


class ProcInfo(Record):
    pid: int
    ppid: int
    sid: int
    create_time: float  # wall clock (boot time + ticks): for display; it moves when the clock is stepped
    state: str
    name: str
    ticks: int = 0  # start in clock ticks since boot: what identity is compared on

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


def read_stat(pid: int, boot: float | None = None, hz: int | None = None) -> ProcInfo | None:
    """One process from /proc/PID/stat: pid, ppid, session, start ticks, create time, state, name; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        if boot is None:
            boot = _boot_time()
        if hz is None:
            hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    rpar = data.rfind(b")")
    fields = data[rpar + 2:].split()
    try:
        start = int(fields[19])  # field 22 (starttime), counted from the state field (3)
        return ProcInfo(
            pid=pid, ppid=int(fields[1]), sid=int(fields[3]), create_time=start / hz + boot,
            state=fields[0].decode(), name=data[data.find(b"(") + 1: rpar].decode("utf-8", "replace"), ticks=start,
        )
    except (IndexError, ValueError):
        return None


def proc_table() -> dict[int, ProcInfo]:
    """One cheap pass over /proc: pid, ppid, session, start ticks, create time (as psutil computes it), state, name."""
    table: dict[int, ProcInfo] = {}
    try:
        boot = _boot_time()
        hz = os.sysconf("SC_CLK_TCK")
        entries = os.listdir("/proc")
    except (OSError, ValueError):
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        info = read_stat(int(entry), boot, hz)
        if info is not None:
            table[info.pid] = info
    return table


def find_tree(pid: int | None, born: Birth | float | None, engine_id: str | None,
              table: dict[int, ProcInfo] | None = None) -> Tree:
    """All live processes of the engine recorded as (pid, birth, engine_id), by the identity rule above.

    `born` is the record's Birth (`birth_of(record)`); a bare float is a legacy wall-clock create time."""
    birth = as_birth(born)
    if not pid or birth is None:
        return Tree(None, [] if not engine_id else find_by_marker(engine_id))
    if birth.other_boot():
        return Tree(None, [])  # recorded before a reboot: no process alive now is the engine's
    if table is None:
        table = proc_table()
    lead = None
    reused: ProcInfo | None = None
    info = table.get(pid)
    if info is not None:
        if birth.same(info):
            if info.state not in ("Z", "X"):
                lead = Proc.of(info)
        else:
            reused = info
    members: list[Any] = []
    for p in table.values():
        if p.sid != pid or p.state in ("Z", "X"):
            continue
        if p.pid == pid:
            if lead is not None:
                members.append(lead)
            continue
        if not birth.not_before(p):
            continue
        if reused is not None and p.ticks >= reused.ticks:
            continue
        proc = Proc.of(p)
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


class StopResult(Record):
    signalled: list[int]
    survivors: list[tuple[int, str]]  # (pid, name) still alive after SIGKILL
    escalated: bool  # SIGKILL was needed
    duration_s: float
    shm_seen: set[str] = field(default_factory=set)  # /dev/shm files the engine's processes held before the signals


def stop_tree(
    pid: int | None,
    born: Birth | float | None,
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
    import signal  # here, not at the top: `status` reads /proc through this module and sends nothing

    started = time.monotonic()
    tree = find_tree(pid, born, engine_id)
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
            tree = find_tree(pid, born, engine_id)
            if not tree.members:
                break
            if tree.leader is None and not sent_to_all:
                # the leader is gone but children linger: give them SIGTERM as well
                _signal_all(tree.members, signal.SIGTERM)
                signalled |= {p.pid for p in tree.members}
                sent_to_all = True
            time.sleep(poll)
    tree = find_tree(pid, born, engine_id)
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
                tree = find_tree(pid, born, engine_id)
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
