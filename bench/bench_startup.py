"""CLI start-up cost against its floors (issue 13): whole-process CPU time (user + sys, from the kernel's accounting of
the finished child), alternating runs, medians and per-pair ratios.

  sage-llm status --json   (4 fake engines recorded and ready)   vs  python -c pass              budget <= 4x
  sage-llm --version                                              vs  python -c pass              budget <= 3x
  sage-llm status          (the Rich table)                       vs  python -c "import typer, rich.console, rich.table"
                                                                                                   budget <= 1.5x

Run: .venv/bin/python bench/bench_startup.py [--runs 11]. Bytecode caching is left on (PYTHONDONTWRITEBYTECODE is
removed for the children), as for any installed package: without it every run compiles every module from source.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, free_port, machine  # noqa: E402

FAKE = ROOT / "tests" / "fakes" / "fake_vllm.py"
PY = str(BIN / "python")
SAGE_LLM = str(BIN / "sage-llm")


def cpu_of(cmd: list[str], env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def pair(a: list[str], b: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    cpu_of(a, env), cpu_of(b, env)  # warm-up: bytecode caches, page cache
    ratios, ta, tb = [], [], []
    for _ in range(runs):
        x, y = cpu_of(a, env), cpu_of(b, env)
        ta.append(x)
        tb.append(y)
        ratios.append(x / y if y else float("inf"))
    return {"a_ms": statistics.median(ta) * 1e3, "b_ms": statistics.median(tb) * 1e3,
            "ratio": statistics.median(ratios)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=11)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory(prefix="sage-bench-startup-") as home:
        env.update(SAGE_LLM_HOME=home, SAGE_LLM_VLLM=f"{PY} {FAKE}", FAKE_VLLM_LOAD_S="0.2", NO_COLOR="1",
                   SAGE_LLM_DOTENV="", SAGE_LLM_CONFIG=str(Path(home) / "none.toml"))
        try:
            for i in range(4):
                subprocess.run([SAGE_LLM, "start", f"org/m{i}", "--name", f"e{i}", "--port", str(free_port())],
                               env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = [
                ("status --json, 4 engines", [SAGE_LLM, "status", "--json"], [PY, "-c", "pass"], 4.0),
                ("--version", [SAGE_LLM, "--version"], [PY, "-c", "pass"], 3.0),
                ("status (table), 4 engines", [SAGE_LLM, "status"],
                 [PY, "-c", "import typer, rich.console, rich.table"], 1.5),
            ]
            print(f"# {machine()}; {args.runs} alternating runs; CPU = user + sys of the finished process")
            print(f"{'command':28} {'CPU ms':>8} {'floor ms':>9} {'ratio':>7} {'budget':>7}  met")
            failed = False
            for label, a, b, budget in rows:
                r = pair(a, b, env, args.runs)
                ok = r["ratio"] <= budget
                failed |= not ok
                print(f"{label:28} {r['a_ms']:8.1f} {r['b_ms']:9.1f} {r['ratio']:6.2f}x {budget:6.1f}x  "
                      f"{'yes' if ok else 'NO'}")
        finally:
            subprocess.run([SAGE_LLM, "stop", "--all"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
