"""Fault-matrix fixtures: a sentinel process that is not ours must survive every fault case untouched."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(autouse=True)
def sentinel():
    """An unrelated process of the same user, in its own session: no fault case may signal it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"], start_new_session=True)
    yield proc
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    assert alive, "a process that is not ours was signalled"
