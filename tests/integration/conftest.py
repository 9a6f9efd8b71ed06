"""Fixtures for the real-vLLM tier (`@pytest.mark.integration`): the CPU engine, the tiny model, ports.

* `real_vllm`    points `sage llm` at the engine environment named by SAGE_LLM_ENGINE_DIR (`make engine` builds it
                 in .engines/cpu). Without it the test is skipped, or fails under CI (CI must never skip silently).
* `tiny_model`   the repo id of a tiny chat model built offline (once, cached in .cache/tiny-hub-N, by the engine's
                 python) and visible to vLLM through HF_HUB_CACHE + HF_HUB_OFFLINE=1. Under greedy decoding it answers
                 every short prompt with exactly TINY_REPLY.
* `engine_port`  a function returning a free port of the "real" window (19000-19099) that no other test session
                 holds (tests/support/ports.py: a lock file per port, kept until teardown): vLLM binds its port only
                 after ~25 s of loading, so a plain "is it free" check races with the other sessions on this machine.

Real engines are heavy (about 2.6 GB RSS, 25-40 s to start on 2 cores): run at most two at once, always stop them
(`stop_all` from the root conftest does at teardown), and pass `--enforce-eager` to skip the torch.compile warm-up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.discipline import skip_or_fail
from tests.support.ports import free_port
from tests.support.tiny import CACHE_NAME, TINY_REPLY, TINY_REPO, build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
TINY_CACHE = ROOT / ".cache" / CACHE_NAME

__all__ = ["TINY_REPLY", "TINY_REPO"]


def engine_dir() -> Path:
    """The engine venv from SAGE_LLM_ENGINE_DIR; skips the test (fails it under CI) when there is none."""
    raw = os.environ.get("SAGE_LLM_ENGINE_DIR", "").strip()
    problem = None
    if not raw:
        problem = "SAGE_LLM_ENGINE_DIR is not set"
    elif not (Path(raw) / "bin" / "vllm").exists():
        problem = f"SAGE_LLM_ENGINE_DIR={raw} has no bin/vllm"
    if problem is None:
        return Path(raw)
    skip_or_fail(f"{problem}: run `make engine` (or `make test-integration`) to install the CPU build of vLLM")
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.fixture
def real_vllm(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make `sage llm start` run the real CPU vLLM; returns the command (SAGE_LLM_VLLM)."""
    cmd = str(engine_dir() / "bin" / "vllm")
    monkeypatch.setenv("SAGE_LLM_VLLM", cmd)
    return cmd


@pytest.fixture(scope="session")
def _tiny_cache() -> Path:
    """Build the tiny model once (about 15-100 s, depending on load), reused by later runs: .cache/tiny-hub-N."""
    python = engine_dir() / "bin" / "python"
    build_tiny_model(TINY_CACHE, python, TINY_REPO)
    return TINY_CACHE


@pytest.fixture
def tiny_model(_tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tiny model's repo id, with HF_HUB_CACHE pointing at its cache and the hub offline for this test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(_tiny_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return TINY_REPO


@pytest.fixture
def engine_port() -> Callable[[], int]:
    """`engine_port()` -> a port of the "real" window, free now and reserved for this test against other sessions."""
    return lambda: free_port("real")
