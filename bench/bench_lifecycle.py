"""Lifecycle budgets (issue 2), measured against the fake vLLM so only our own overhead is timed.

* `sage-llm status --json` with 4 engines recorded: median <= 100 ms and <= 1.6x `python -c "import typer"`,
  the two timed interleaved in the same run.
* `start` returns <= 250 ms after the engine first answers /health with 200 (the fake logs when it starts listening).
* `stop` returns <= 0.5 s after the engine's last process exits (the fake logs when it exits).

Usage: python bench/bench_lifecycle.py [--runs N]   (prints a JSON summary)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, fake_env, free_port, machine, median


def _stamp(log: Path, key: str) -> float | None:
    m = re.findall(rf"{key} ([0-9.]+)", log.read_text(errors="replace"))
    return float(m[-1]) if m else None


def bench_status(runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = fake_env(home)
        sage = str(BIN / "sage-llm")
        for i in range(4):
            subprocess.run([sage, "start", f"bench/model-{i}", "--port", str(free_port()), "--name", f"e{i}"],
                           env=env, check=True, capture_output=True)
        status_t, typer_t = [], []
        try:
            for _ in range(runs):
                t = time.perf_counter()
                out = subprocess.run([sage, "status", "--json"], env=env, capture_output=True, text=True)
                status_t.append(time.perf_counter() - t)
                doc = json.loads(out.stdout)
                assert [e["state"] for e in doc["engines"] if e["managed"]].count("ready") == 4, doc
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", "import typer"], check=True)
                typer_t.append(time.perf_counter() - t)
        finally:
            subprocess.run([sage, "stop", "--all"], env=env, capture_output=True)
    s, ty = median(status_t), median(typer_t)
    return {"status_json_median_ms": round(s * 1000, 1), "import_typer_median_ms": round(ty * 1000, 1),
            "ratio": round(s / ty, 2), "runs": runs, "budget_ok": s <= 0.100 and s / ty <= 1.6}


def bench_start_stop(runs: int) -> dict:
    start_gap, stop_gap = [], []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = fake_env(home)
        sage = str(BIN / "sage-llm")
        for i in range(runs):
            name = f"s{i}"
            subprocess.run([sage, "start", "bench/model", "--port", str(free_port()), "--name", name],
                           env=env, check=True, capture_output=True)
            returned = time.time()
            log = home / "logs" / f"{name}.log"
            listen = _stamp(log, "FAKE_LISTEN_AT")
            start_gap.append(returned - listen)
            subprocess.run([sage, "stop", name], env=env, check=True, capture_output=True)
            returned = time.time()
            exited = _stamp(log, "FAKE_EXIT_AT")
            stop_gap.append(returned - exited)
    return {"start_after_listen_median_ms": round(median(start_gap) * 1000, 1),
            "start_after_listen_max_ms": round(max(start_gap) * 1000, 1),
            "stop_after_exit_median_ms": round(median(stop_gap) * 1000, 1),
            "stop_after_exit_max_ms": round(max(stop_gap) * 1000, 1), "runs": runs,
            "budget_ok": median(start_gap) <= 0.25 and median(stop_gap) <= 0.5}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    result = {"machine": machine(), "status": bench_status(args.runs), "start_stop": bench_start_stop(
        max(5, args.runs // 2))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
