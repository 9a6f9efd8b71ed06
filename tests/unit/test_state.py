"""The state directory: private, atomic, and tolerant of corrupt records."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sage_llm.core import paths
from sage_llm.core.errors import StateError, UsageError
from sage_llm.core.state import CorruptRecord, EngineRecord, StateStore, validate_name


def _record(name: str = "a", port: int = 8001) -> EngineRecord:
    return EngineRecord(name=name, model="org/m", served_model_name="org/m", host="127.0.0.1", port=port, pid=123,
                        create_time=1.0, log_file="/x.log", started_at="2026-01-01T00:00:00Z")


def test_home_and_records_are_private(home):
    store = StateStore()
    store.save(_record())
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "engines").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "engines" / "a.json").st_mode) == 0o600
    assert not [p for p in (home / "engines").iterdir() if p.name.startswith(".")], "temp files left behind"


def test_roundtrip_and_base_url(home):
    store = StateStore()
    store.save(_record("qwen", 8123))
    rec = store.load("qwen")
    assert isinstance(rec, EngineRecord)
    assert rec.port == 8123
    assert rec.base_url == "http://127.0.0.1:8123/v1"


def test_wildcard_host_base_url_is_loopback():
    rec = _record()
    rec.host = "0.0.0.0"
    assert rec.base_url == "http://127.0.0.1:8001/v1"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "empty"),
        ('{"name": "a", "model": "m", "host": "h", "po', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"name": "a", "model": "m", "host": "h", "port": 1, "schema_version": 99}), "newer"),
        (json.dumps({"name": "a", "model": "m"}), "no 'host'"),
        (json.dumps({"name": "b", "model": "m", "host": "h", "port": 1}), "names engine 'b'"),
    ],
)
def test_corrupt_records_are_reported_not_raised(home, content, fragment):
    store = StateStore()
    store.ensure()
    (home / "engines" / "a.json").write_text(content)
    rec = store.load("a")
    assert isinstance(rec, CorruptRecord)
    assert fragment in rec.error


def test_symlinked_home_is_refused(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("SAGE_LLM_HOME", str(link))
    with pytest.raises(StateError, match="symlink"):
        paths.ensure_home()


def test_home_owned_by_someone_else_is_refused(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    owner = os.getuid()
    # a directory of another user, without root to chown it: we run as someone else instead
    monkeypatch.setattr(os, "getuid", lambda: owner + 12345)
    monkeypatch.setenv("SAGE_LLM_HOME", str(other))
    with pytest.raises(StateError, match=f"owned by uid {owner}, not you"):
        paths.ensure_home()


def test_loose_permissions_are_tightened(tmp_path, monkeypatch):
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o755)
    monkeypatch.setenv("SAGE_LLM_HOME", str(loose))
    paths.ensure_home()
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "x y", "-x", "a;rm", "$(x)", "a" * 64])
def test_bad_names(bad):
    with pytest.raises(UsageError):
        validate_name(bad)


def test_uncreatable_state_dir_is_a_clear_error(monkeypatch):
    # /proc refuses new directories even to root, so this runs the same in CI (as root) and for users
    monkeypatch.setenv("SAGE_LLM_HOME", "/proc/sage-llm-test/home")
    with pytest.raises(StateError, match="cannot create state directory"):
        StateStore().save(_record())


def test_full_disk_leaves_nothing_half_written(home, monkeypatch):
    import errno

    store = StateStore()
    store.save(_record("keep", 8001))
    before = (home / "engines" / "keep.json").read_text()

    def boom(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", boom)
    rec = _record("keep", 9999)
    with pytest.raises(StateError, match="disk is full"):
        store.save(rec)
    monkeypatch.undo()
    assert (home / "engines" / "keep.json").read_text() == before
    assert sorted(p.name for p in (home / "engines").iterdir()) == ["keep.json"]
