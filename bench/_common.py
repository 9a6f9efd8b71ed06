"""Helpers shared by the benchmarks: timing loops, fake engines, free ports, and machine facts for
docs/benchmarks.md."""

from __future__ import annotations

import fcntl
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE_VLLM = ROOT / "tests" / "fakes" / "fake_vllm.py"
BIN = Path(sys.executable).parent
# the benchmarks' own ports, beside the tests' windows (tests/support/ports.py: 19000-19699) and with the same lock
# files, so a benchmark and test sessions running at once on this machine never pick the same port
PORT_WINDOW = range(19700, 20000)
PORT_LOCKS = Path(os.environ.get("TMPDIR", "/tmp")) / "sage-llm-test-ports"
_held: list[int] = []


def free_port() -> int:
    """A port of PORT_WINDOW that nothing listens on and no test session or other benchmark holds, reserved (its
    lock file, flock) until this process exits."""
    from sage_llm.engine import process

    PORT_LOCKS.mkdir(parents=True, exist_ok=True)
    for port in PORT_WINDOW:
        fd = os.open(PORT_LOCKS / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if process.port_is_free("127.0.0.1", port):
            _held.append(fd)
            return port
        os.close(fd)
    raise SystemExit(f"no free port in {PORT_WINDOW.start}-{PORT_WINDOW.stop - 1}")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"


def timeit(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fake_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"SAGE_LLM_HOME": str(home), "SAGE_LLM_VLLM": f"{sys.executable} {FAKE_VLLM}",
                "FAKE_VLLM_LOAD_S": "0.2", "NO_COLOR": "1"})
    env.update(extra)
    return env
