"""Helpers shared by the benchmarks: timing loops, fake engines, and machine facts for docs/benchmarks.md."""

from __future__ import annotations

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
