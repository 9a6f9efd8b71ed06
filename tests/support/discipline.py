"""Test discipline helpers, one place each (docs/reliability.md, "Test discipline"):

* `skip_or_fail(reason)`  the only way a test steps aside because of its environment (no engine installed, a port
                          window held by other sessions, no /dev/shm...): a skip on a developer's machine, a failure
                          under CI (env CI set), where every test must run.
* `committed(path)`       a fixture file committed to this repository: missing is a failure everywhere, never a skip.
* `wait_for(cond, ...)`   wait for a condition with a deadline instead of sleeping and hoping: returns the
                          condition's first truthy value, fails the test (saying what it waited for) at the deadline.
                          Deadlines are generous ceilings, not expected durations, so a slow CPU only waits longer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def in_ci() -> bool:
    """CI set (CI=true, as CI services set it; CI=0/false/no count as unset)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip the test (fail it under CI, where nothing may be skipped for want of the environment)."""
    if in_ci():
        pytest.fail(f"CI must run this test: {reason}", pytrace=False)
    pytest.skip(reason)


def committed(path: str | Path) -> Path:
    """`path`, a fixture committed to the repository: a missing one fails the test, CI or not."""
    p = Path(path)
    if not p.is_file():
        pytest.fail(f"the committed file {p} is missing: restore it (git checkout -- {p})", pytrace=False)
    return p


def wait_for(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
             what: str | Callable[[], str] | None = None) -> T:
    """Poll `cond()` until it returns something truthy (returned), at most `timeout` s; then fail the test, saying
    `what` was awaited (a callable is asked then, so it can tell what was seen last)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what or getattr(cond, "__name__", "a condition")
            pytest.fail(f"waited {timeout:g} s for {said}", pytrace=False)
        time.sleep(interval)
