"""The test suite's own rules (docs/reliability.md, "Test discipline"): the developer's shell does not reach a test,
ports are reserved against other sessions, an environment that is missing skips only outside CI, a committed
fixture that is missing fails, and waiting has a deadline."""

from __future__ import annotations

import fcntl
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import SHELL_VARS
from tests.support import ports as _ports
from tests.support.discipline import committed, skip_or_fail, wait_for
from tests.support.ports import free_port, release_all

ROOT = Path(__file__).resolve().parent.parent


def test_the_shell_environment_does_not_reach_a_test(tmp_path: Path) -> None:
    """A pytest session started from a shell with RAY_ADDRESS, HF_*, CUDA_VISIBLE_DEVICES and proxies set: its tests
    see none of them (the root conftest's autouse fixture), and HF_HOME is the test's own."""
    inner = tmp_path / "test_inner.py"
    inner.write_text(textwrap.dedent(f"""
        import os

        def test_inner():
            leaked = {{k: os.environ[k] for k in {SHELL_VARS!r} if k in os.environ}}
            assert leaked == {{}}
            assert os.environ["HF_HOME"] != "/shell/hf-home"
            assert os.environ["SAGE_LOCAL_ENGINE_PORT"] != "8000"
    """))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({var: "http://10.255.255.1:3128" if "proxy" in var.lower() else "shell-value" for var in SHELL_VARS})
    env.update(RAY_ADDRESS="10.0.0.5:6379", CUDA_VISIBLE_DEVICES="0", HF_HOME="/shell/hf-home",
               SAGE_LOCAL_ENGINE_PORT="8000")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(inner)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def _locked_elsewhere(port: int) -> bool:
    """Whether another process (another pytest session) finds the port's lock taken."""
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", code, str(_ports.LOCK_DIR / f"{port}.lock")]).returncode == 1


def test_a_port_is_reserved_against_other_sessions_until_the_test_ends() -> None:
    port = free_port()
    assert port in _ports.WINDOWS["fake"]
    assert _locked_elsewhere(port)
    wide = free_port(span=2)
    assert port not in (wide, wide + 1)
    assert _locked_elsewhere(wide)
    assert _locked_elsewhere(wide + 1)
    assert free_port() not in (port, wide, wide + 1)  # this session does not hand a held port out twice
    release_all()  # what the root conftest does when a test ends
    assert not _locked_elsewhere(port)
    assert not _locked_elsewhere(wide + 1)


def test_the_windows_do_not_overlap() -> None:
    spans = sorted((r.start, r.stop) for r in _ports.WINDOWS.values())
    assert all(a_stop <= b_start for (_a, a_stop), (b_start, _b) in itertools.pairwise(spans))
    assert spans[-1][1] <= 19700  # bench/_common.py has 19700-19999
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert _common.PORT_WINDOW.start >= 19700
    assert _common.PORT_LOCKS == _ports.LOCK_DIR


def test_a_held_window_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setitem(_ports.WINDOWS, "tiny", range(port, port + 1))  # its only port is held (by us)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no 1 free port"):
        free_port("tiny")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run this test"):
        free_port("tiny")
    with pytest.raises(pytest.fail.Exception, match="CI must run this test: no engine"):
        skip_or_fail("no engine")


def test_a_missing_committed_fixture_fails_ci_or_not(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.fail.Exception, match="is missing"):
        committed(tmp_path / "gone.log")
    here = Path(__file__)
    assert committed(here) == here


def test_wait_for_returns_the_value_or_fails_at_the_deadline() -> None:
    calls = []
    assert wait_for(lambda: calls.append(1) or (len(calls) >= 3 and "done"), timeout=5, interval=0) == "done"
    with pytest.raises(pytest.fail.Exception, match=r"waited 0\.05 s for the moon"):
        wait_for(lambda: None, timeout=0.05, what="the moon")


def test_fcntl_locks_are_per_open_file() -> None:
    """What the port locks rely on: a second open of the same lock file, even in this process, is refused."""
    port = free_port()
    fd = os.open(_ports.LOCK_DIR / f"{port}.lock", os.O_RDWR)
    try:
        with pytest.raises(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
