"""Headless Chromium (Debian's `chromium` package) driven by Playwright for Python, for the web panel's tests.

Never downloads a browser (`playwright install` is not used): the executable is /usr/bin/chromium, or
SAGE_LLM_CHROMIUM. Where it or Playwright is missing, the browser tests skip with the reason, except in CI (`CI` set),
where they fail: `make test` installs Chromium there (apt) before running them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    explicit = os.environ.get("SAGE_LLM_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(candidate).exists():
            return candidate
    return shutil.which("chromium")


def missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed: pip install -e '.[dev]'"
    if chromium_path() is None:
        return ("Chromium is absent: `apt-get install chromium chromium-driver` (`make test` does it when run as "
                "root), or set SAGE_LLM_CHROMIUM")
    return None


def require() -> str:
    reason = missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {reason}")
        pytest.skip(f"browser tests skipped: {reason}")
    path = chromium_path()
    assert path is not None
    return path
