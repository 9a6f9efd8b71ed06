"""Shared fixtures: every test gets its own state directory, no colour, a wide terminal, and no GPU; nothing of the
developer's shell that changes what the code under test does (Ray address, hub settings, GPUs, proxies) gets in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.ports import LOCK_DIR, OWNER, free_port, release_all

ROOT = Path(__file__).resolve().parent.parent
FAKE_VLLM = ROOT / "tests" / "fakes" / "fake_vllm.py"


# variables of the developer's shell that would change what a test sees: the default of `start --ray-address`, the
# hub's offline switch and token file, the GPUs vLLM may use, and proxies (httpx and pip honour them). A test that
# needs one sets it itself (the integration tier's `tiny_model` sets HF_HUB_OFFLINE=1).
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY",
              "no_proxy")
SHELL_VARS = ("RAY_ADDRESS", "HF_HUB_OFFLINE", "HF_TOKEN_PATH", "CUDA_VISIBLE_DEVICES", *PROXY_VARS)
# the proxies of the shell, for the one thing a test may fetch from a package registry (pip in test_models_import.py)
SHELL_PROXIES = {k: os.environ[k] for k in PROXY_VARS if k in os.environ}


@pytest.fixture(autouse=True)
def _isolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "sage-home"
    for var in SHELL_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never the user's token or cache
    monkeypatch.setenv("SAGE_LLM_HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    # `start` without --port takes the next free port from there: a few engines of one test stay in reserved ports
    monkeypatch.setenv("SAGE_LOCAL_ENGINE_PORT", str(free_port(span=4)))
    # ... skipping ports other test sessions hold (tests/support/ports.py): suites run side by side never collide
    monkeypatch.setenv("SAGE_LLM_PORT_LOCK_DIR", str(LOCK_DIR))
    monkeypatch.setenv("SAGE_LLM_PORT_LOCK_OWNER", OWNER)
    # no test touches the network: the hub is a closed local port (connection refused at once)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("SAGE_LLM_CONFIG", str(tmp_path / "config" / "llm.toml"))  # never the user's config file
    monkeypatch.setenv("SAGE_LLM_DOTENV", "")  # nor a .env in the current directory
    for var in ("SAGE_LLM_VLLM", "VLLM_API_KEY", "SAGE_LOCAL_ENGINE_DEFAULT_MODEL", "SAGE_LOCAL_ENGINE_GPU_UTIL",
                "HF_TOKEN", "SAGE_CHAT_API_KEY", "OPENAI_API_KEY", "SAGE_CHAT_BASE_URL", "OPENAI_BASE_URL",
                "SAGE_CHAT_MODEL", "SAGE_LOCAL_ENGINE_HOST", "SAGE_LLM_STARTUP_TIMEOUT", "SAGE_LLM_STOP_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    from sage_llm.cli import _output
    from sage_llm.observe import gpu

    # every test sees "no NVIDIA driver", whatever the host has; GPU tests inject a fake NVML with gpu.set_backend()
    monkeypatch.setattr(gpu, "DRIVER_MARKERS", ("/nonexistent/sage-llm-test/nvidiactl",))
    gpu.reset()
    _output.reset()
    yield home
    gpu.reset()
    release_all()  # the ports this test reserved (tests/support/ports.py): every other fixture of the test is torn down


@pytest.fixture
def home(_isolation: Path) -> Path:
    return _isolation


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the launcher at the fake vLLM; returns the command prefix."""
    cmd = f"{sys.executable} {FAKE_VLLM}"
    monkeypatch.setenv("SAGE_LLM_VLLM", cmd)
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", os.environ.get("FAKE_VLLM_LOAD_S", "0.3"))
    return cmd


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run the real CLI entry (`main.run`, with its error mapping) in-process: returns (code, stdout, stderr)."""
    from sage_llm.cli import _output
    from sage_llm.cli.main import run

    def invoke(*args: str, prog: str = "sage-llm") -> tuple[int, str, str]:
        capsys.readouterr()
        _output.reset()
        code = run(list(args), prog)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


@pytest.fixture
def stop_all():
    """Stop every engine recorded in the test's state directory at teardown (so no test leaks a process)."""
    yield
    from sage_llm.core.state import StateStore
    from sage_llm.engine import manager

    store = StateStore()
    for name in store.names():
        try:
            manager.stop(name, timeout=5, store=store)
        except Exception:
            manager.stop(name, timeout=0, force=True, store=store)
