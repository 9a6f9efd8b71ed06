"""Ray for tests of loopback clusters (`ray.cluster_utils.Cluster` on 127.0.0.1)."""

from __future__ import annotations

import os
from typing import Any

import pytest


def import_ray() -> Any:
    """Ray, imported with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads at import (docs/distributed.md,
    "Loopback clusters"); the variable is set for the import only, so the other tests of the session see the
    environment they expect. Skips the calling module when Ray is not installed."""
    had = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in os.environ
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        return pytest.importorskip("ray")
    finally:
        if not had:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
