"""Keys per person for a shared gateway: `<state dir>/gateway-keys.json` (0600), managed by `sage-llm gateway keys`.

A key is `sk-sage-` + 256 random bits (secrets.token_urlsafe(32)); the prefix lets secret scanners find leaked ones.
The file stores only SHA-256 hashes of the keys. A key has 256 bits of entropy, so a fast hash is as safe as a slow
KDF here (nobody can enumerate 2**256 candidates; slow KDFs exist for low-entropy passwords), and it keeps the
per-request check at a microsecond.

Writers (two admins adding or revoking at once) take an flock on `gateway-keys.lock`, re-read, change, and replace the
file atomically: nothing is lost and a reader never sees half a file. A running gateway (KeyRing) stats the file per
request and re-reads it when it changed; a file it cannot use (corrupt, or from a newer sage-llm) leaves the last good
keys in force, and the reason is logged and shown in GET /api/gateway. The file's existence is what makes a gateway
shared: `keys rm` of the last key leaves nobody able to get in, rather than opening the gateway to everyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sage_llm.core import paths
from sage_llm.core.errors import SageLLMError, UsageError

FILE_NAME = "gateway-keys.json"
LOCK_NAME = "gateway-keys.lock"
VERSION = 1
PREFIX = "sk-sage-"
ROLES = ("user", "admin")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
SHOWN = len(PREFIX) + 4  # how much of a presented key may appear in a log line

log = logging.getLogger("sage_llm.gateway")


class KeyFileError(SageLLMError):
    """The key file cannot be used (corrupt, unreadable, or written by a newer sage-llm)."""


@dataclass(frozen=True)
class Key:
    name: str
    role: str = "user"
    models: tuple[str, ...] = ("*",)  # fnmatch patterns over the model name a client asks for
    max_concurrency: int | None = None
    tokens_per_minute: int | None = None
    created: str = ""
    hash: str = field(default="", repr=False)

    def model_rule(self, model: str) -> str | None:
        """None when this key may use `model`; else the refusal naming the rule."""
        if self.models == ("*",) or any(fnmatch.fnmatchcase(model, p) for p in self.models):  # "*": every key's default
            return None
        return (f"key {self.name!r} may not use model {model!r}: its models are {', '.join(self.models)} "
                f"(an admin changes that with `sage-llm gateway keys add {self.name} --models PATTERN` after "
                f"`keys rm`)")

    def public(self) -> dict[str, Any]:
        """What `keys list --json` shows: never the secret, nor its hash."""
        return {"name": self.name, "role": self.role, "models": list(self.models),
                "max_concurrency": self.max_concurrency, "tokens_per_minute": self.tokens_per_minute,
                "created": self.created}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def shown(secret: str) -> str:
    """The most of a presented key that may be logged."""
    return (secret[:SHOWN] + "...") if len(secret) > SHOWN else "***"


def path(root: Path | None = None) -> Path:
    return (root or paths.home()) / FILE_NAME


# ------------------------------------------------------------------------------------------------ the file
def _parse(raw: bytes, where: Path) -> dict[str, Key]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise KeyFileError(f"key file {where} is not valid JSON ({exc})",
                           hint="restore it from a backup or remove it and add the keys again") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeyFileError(f"key file {where} has no `keys` list", hint="remove it and add the keys again")
    version = doc.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise KeyFileError(f"key file {where} is version {version!r}, newer than this sage-llm understands "
                           f"({VERSION})", hint="upgrade sage-llm (pip install -U sage-llm)")
    out: dict[str, Key] = {}
    for item in doc["keys"]:
        try:
            key = Key(name=str(item["name"]), role=str(item["role"]), models=tuple(item.get("models") or ("*",)),
                      max_concurrency=item.get("max_concurrency"), tokens_per_minute=item.get("tokens_per_minute"),
                      created=str(item.get("created", "")), hash=str(item["hash"]))
        except (KeyError, TypeError) as exc:
            raise KeyFileError(f"key file {where}: an entry lacks {exc}", hint="remove it and add the key again") \
                from None
        if key.role not in ROLES or len(key.hash) != 64:
            raise KeyFileError(f"key file {where}: entry {key.name!r} is damaged (role or hash)",
                               hint=f"`sage-llm gateway keys rm {key.name}` and add it again")
        out[key.name] = key
    return out


def read(root: Path | None = None) -> dict[str, Key]:
    """Name -> Key; {} when there is no file. KeyFileError when it cannot be used."""
    target = path(root)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {target}: {exc.strerror}") from None
    return _parse(raw, target)


def _write(keys: dict[str, Key], root: Path | None) -> None:
    from sage_llm.core.state import atomic_write_json

    atomic_write_json(path(root), {"version": VERSION, "keys": [asdict(k) | {"models": list(k.models)}
                                                                for k in keys.values()]})


@contextlib.contextmanager
def _locked(root: Path | None) -> Iterator[dict[str, Key]]:
    """Exclusive flock over read-change-write; yields the current keys to change in place, then writes them."""
    base = paths.ensure_home(root)
    fd = os.open(base / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        keys = read(root)
        before = dict(keys)
        yield keys
        if keys != before:
            _write(keys, root)
    finally:
        os.close(fd)  # closing releases the lock


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise UsageError(f"key name {name!r} is not a plain name",
                         hint="letters, digits, '.', '_', '-', '@'; up to 64 characters, e.g. alice")


def _positive(value: int | None, what: str) -> int | None:
    if value is not None and value < 1:
        raise UsageError(f"{what} {value} must be at least 1", hint=f"e.g. {what} 4, or leave it out for no limit")
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def add(name: str, role: str = "user", models: list[str] | None = None, max_concurrency: int | None = None,
        tokens_per_minute: int | None = None, root: Path | None = None) -> tuple[Key, str]:
    """A new key; returns it and its secret (shown once: only the hash is kept)."""
    _check_name(name)
    if role not in ROLES:
        raise UsageError(f"--role {role!r} is not a role", hint="user or admin")
    pats = tuple(p.strip() for p in (models or ["*"]) if p.strip())
    if not pats:
        raise UsageError("--models needs a pattern", hint="e.g. --models 'Qwen/*'")
    _positive(max_concurrency, "--max-concurrency")
    _positive(tokens_per_minute, "--tokens-per-minute")
    secret = PREFIX + secrets.token_urlsafe(32)
    with _locked(root) as keys:
        if name in keys:
            raise UsageError(f"a key named {name!r} exists", hint=f"`sage-llm gateway keys rotate {name}` for a new "
                             f"secret, or `keys rm {name}` first")
        key = Key(name=name, role=role, models=pats, max_concurrency=max_concurrency,
                  tokens_per_minute=tokens_per_minute, created=_now(), hash=digest(secret))
        keys[name] = key
    return key, secret


def remove(name: str, root: Path | None = None) -> Key:
    with _locked(root) as keys:
        if name not in keys:
            raise UsageError(f"no key named {name!r}", hint="see `sage-llm gateway keys list`")
        return keys.pop(name)


def rotate(name: str, root: Path | None = None) -> tuple[Key, str]:
    """A new secret for `name` (same role and limits); the old secret stops working at once."""
    secret = PREFIX + secrets.token_urlsafe(32)
    with _locked(root) as keys:
        if name not in keys:
            raise UsageError(f"no key named {name!r}", hint="see `sage-llm gateway keys list`")
        old = keys[name]
        keys[name] = Key(**{**asdict(old), "models": old.models, "hash": digest(secret), "created": _now()})
    return keys[name], secret


def listing(root: Path | None = None) -> list[Key]:
    return sorted(read(root).values(), key=lambda k: k.name)


# ------------------------------------------------------------------------------------------------ the gateway's view
class KeyRing:
    """The keys a running gateway accepts. `refresh()` is a stat per call; a changed file is re-read; a bad one
    keeps the last good keys (and `error` says why)."""

    def __init__(self, root: Path | None = None) -> None:
        self.path = path(root)
        self._where = str(self.path)  # os.stat of a str: no Path conversion per request
        self.by_hash: dict[str, Key] = {}
        self.error: str | None = None
        self._stamp: tuple[int, int, int] | None = None
        self.refresh()

    @property
    def active(self) -> bool:
        """A key file exists: the gateway is shared. Removing the last key does not reopen it (nobody gets in until
        a key is added, or the file is deleted to go back to the open loopback mode)."""
        return self._stamp is not None

    def refresh(self) -> None:
        if self._stamp is None and self.error is None and not os.access(self._where, os.F_OK):
            return  # still no key file (the open loopback mode): one syscall, no exception raised per request
        try:
            st = os.stat(self._where)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            self._fail(f"cannot stat {self.path}: {exc.strerror}")
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if stamp is None:
            self.by_hash, self.error = {}, None  # removed file: back to no keys (as `keys rm` of the last one)
            return
        try:
            keys = _parse(self.path.read_bytes(), self.path)
        except KeyFileError as exc:
            self._fail(exc.message + " (still serving the last good keys)")
            return
        except OSError as exc:
            self._fail(f"cannot read {self.path}: {exc.strerror} (still serving the last good keys)")
            return
        self.by_hash = {k.hash: k for k in keys.values()}
        self.error = None

    def _fail(self, why: str) -> None:
        if why != self.error:
            log.error("gateway keys: %s", why)
        self.error = why

    def lookup(self, secret: str) -> Key | None:
        h = digest(secret)
        key = self.by_hash.get(h)
        # the dict finds the candidate by hash (an attacker cannot steer a SHA-256); the compare itself is constant-time
        return key if key is not None and hmac.compare_digest(key.hash, h) else None

    def describe(self) -> dict[str, Any]:
        return {"file": str(self.path), "keys": len(self.by_hash), "error": self.error}
