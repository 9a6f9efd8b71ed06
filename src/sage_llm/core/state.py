"""Engine records on disk: one JSON file per engine, atomic writes, one file lock for mutations.

A record is the only memory this tool has of an engine. It is written before the engine is spawned (so a CLI killed
mid-start leaves a record that `status` and `stop` can use) and removed only after `stop` has confirmed that no
process of the engine is left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from sage_llm.core import paths
from sage_llm.core.errors import StateError, UsageError
from sage_llm.core.records import Record, asdict, field, fields

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def validate_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UsageError(
            f"invalid engine name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
            hint="for example --name qwen-7b",
        )
    return name


class EngineRecord(Record):
    """What we know about one managed engine. Secrets are never stored: only the *name* of the key variable."""

    name: str
    model: str
    served_model_name: str
    host: str
    port: int
    id: str = ""  # random id, also set as SAGE_LLM_ENGINE_ID in the engine's environment
    pid: int | None = None  # the `vllm serve` process; also its process-group and session id
    create_time: float | None = None  # psutil create_time of pid (wall clock): identity in records of sage-llm <= 0.1.0
    # identity of pid, against PID reuse: its start in clock ticks since boot (/proc/PID/stat field 22) and the kernel
    # boot id; neither moves when the wall clock is stepped. Older sage-llm versions ignore these fields.
    start_ticks: int | None = None
    boot_id: str | None = None
    log_file: str = ""
    started_at: str = ""  # ISO 8601, UTC
    state: str = "launching"  # launching | running | failed (live state is computed by probing)
    ready_at: str | None = None  # ISO 8601, UTC: when it first served the model (its memory is allocated from then)
    # the context length it serves: the user's --max-model-len, or the one vLLM chose (`--max-model-len auto`)
    max_model_len: int | None = None
    error: str | None = None
    argv: list[str] = field(default_factory=list)  # the full command line (holds no secret)
    settings: dict[str, Any] = field(default_factory=dict)  # launch options, enough to start it again
    env: dict[str, str] = field(default_factory=dict)  # variables we set for the engine (no secrets)
    engine_env: str | None = None  # path of the engine environment used, if any
    api_key_env: str | None = None  # name of the variable holding the API key, never the key
    gpus: list[dict[str, Any]] = field(default_factory=list)
    foreground: bool = False  # started by `sage-llm run`
    owner_pid: int | None = None  # the `sage` process that owns a foreground engine
    dtype: str | None = None  # the --dtype it was started with ("auto": vLLM chose); see engine/vllm.py choose_dtype
    dtype_source: str | None = None  # user | cpu-default | auto
    # engines placed on a Ray cluster (`start --cluster`, engine/cluster.py): address, node_id, node_ip, agent, gpus,
    # pid (on that node). Their pid above stays None: no process of this machine is theirs.
    cluster: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> EngineRecord:
        if not isinstance(data, dict):
            raise ValueError("record is not a JSON object")
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"record schema_version {version!r} is not an integer")
        if version > SCHEMA_VERSION:
            raise NewerRecordError(f"schema_version {version}, newer than the {SCHEMA_VERSION} this sage-llm reads")
        known = set(fields(cls))
        kwargs = {k: v for k, v in data.items() if k in known}
        for required in ("name", "model", "host", "port"):
            if required not in kwargs:
                raise ValueError(f"record has no {required!r}")
        kwargs.setdefault("served_model_name", kwargs["model"])
        if not isinstance(kwargs["port"], int):
            raise ValueError("record port is not an integer")
        return cls(**kwargs)

    @property
    def base_url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.port}/v1"


def connect_host(host: str) -> str:
    """Where to connect for a server bound to `host`, as it goes into a URL (addresses.url_host)."""
    from sage_llm.core.addresses import url_host

    return url_host(host)


def api_key_for(record: EngineRecord) -> str | None:
    """The engine's API key (the key itself is never recorded): for an engine a gateway started, derived from this
    user's gateway secret as the gateway derives it (core/engine_keys.py); else from the variable named at its start.
    None when neither is available here."""
    from sage_llm.core import engine_keys

    if not record.api_key_env:
        return None
    if engine_keys.is_gateway_key(record.api_key_env):
        return engine_keys.key_for(record.api_key_env)
    return os.environ.get(record.api_key_env)


def utcnow_iso() -> str:
    """Now in UTC, to the second: 2026-12-06T18:25:01Z (time, not datetime: `status` skips importing datetime)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_ISO_UTC = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:Z|\+00:00)")
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def parse_iso(value: str | None) -> float | None:
    """Seconds since the epoch for an ISO 8601 time, None if it is not one. The form `utcnow_iso` writes is read
    without datetime (`status` reads one per engine and skips importing datetime: docs/benchmarks.md); any other form
    goes through datetime.fromisoformat."""
    if not value:
        return None
    m = _ISO_UTC.fullmatch(value)
    if m:
        y, mo, d, hh, mi, ss = (int(g) for g in m.groups())
        leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
        if 1 <= mo <= 12 and 1 <= d <= _MONTH_DAYS[mo - 1] + (mo == 2 and leap) and hh < 24 and mi < 60 and ss < 60:
            return float(_days_from_civil(y, mo, d) * 86400 + hh * 3600 + mi * 60 + ss)
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm; what calendar.timegm computes)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


class NewerRecordError(ValueError):
    """The record was written by a newer sage-llm (a higher schema_version)."""


class CorruptRecord(Record):
    """A record file that could not be read: reported, never acted upon."""

    name: str
    path: str
    error: str
    # written by a newer sage-llm: it may describe a live engine, so it is never removed, not even by `stop --force`
    newer: bool = False

    def newer_error(self) -> UsageError:
        """The refusal for any command that would act on a record from a newer sage-llm."""
        return UsageError(f"engine record {self.path} was written by a newer sage-llm ({self.error}); "
                          "it was left alone", hint="upgrade sage-llm (pip install -U sage-llm) and run this again")


class StateStore:
    """The engines/ directory. Reads need no lock (files are replaced atomically); mutations hold `lock()`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.home()

    @property
    def engines(self) -> Path:
        return paths.engines_dir(self.root)

    @property
    def logs(self) -> Path:
        return paths.logs_dir(self.root)

    def ensure(self) -> None:
        paths.ensure_home(self.root)

    def path_for(self, name: str) -> Path:
        validate_name(name)
        return self.engines / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock over all mutations of the state directory (fcntl.flock: released if we die)."""
        self.ensure()
        lock_path = self.root / ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open lock file {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ---- reading ----
    def names(self) -> list[str]:
        # records steer which processes we signal: never read them from a directory someone else controls
        paths.check_private_dir(self.root)
        try:
            entries = sorted(self.engines.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"cannot read {self.engines}: {exc.strerror}") from exc
        return [p.stem for p in entries if p.suffix == ".json" and not p.name.startswith(".")]

    def load(self, name: str) -> EngineRecord | CorruptRecord | None:
        path = self.engines / f"{name}.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            return CorruptRecord(name, str(path), f"unreadable record: {exc}")
        if not text.strip():
            return CorruptRecord(name, str(path), "record file is empty")
        try:
            record = EngineRecord.from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            return CorruptRecord(name, str(path), f"record is not valid JSON ({exc.msg} at line {exc.lineno})")
        except NewerRecordError as exc:
            return CorruptRecord(name, str(path), str(exc), newer=True)
        except (ValueError, TypeError) as exc:
            return CorruptRecord(name, str(path), f"invalid record: {exc}")
        if record.name != name:
            return CorruptRecord(name, str(path), f"record names engine {record.name!r}, not {name!r}")
        return record

    def all(self) -> list[EngineRecord | CorruptRecord]:
        out: list[EngineRecord | CorruptRecord] = []
        for name in self.names():
            rec = self.load(name)
            if rec is not None:
                out.append(rec)
        return out

    # ---- writing (call under lock) ----
    def save(self, record: EngineRecord) -> None:
        self.ensure()
        atomic_write_json(self.path_for(record.name), record.to_json())

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.engines / f"{name}.json").unlink()

    def forget(self, name: str, engine_id: str) -> None:
        """Under the lock, remove `name`'s record only if it is still engine `engine_id`'s (a racing `start` may have
        recorded a new engine under the name meanwhile)."""
        with self.lock():
            current = self.load(name)
            if isinstance(current, EngineRecord) and current.id == engine_id:
                self.remove(name)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory (0600), fsync, then rename over `path`."""
    import tempfile

    payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise StateError(
            f"cannot write {path}: {reason}",
            hint="free some space or fix the permissions of the state directory; nothing was changed",
        ) from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
