"""Run every fast benchmark (fake engines; no real vLLM) one after another and print their output.

The real-engine ones need `make engine` and take minutes: run them on their own
(`bench/bench_real_engine.py`, `bench/soak_real.py`). Figures go to docs/benchmarks.md by hand, with the machine,
the date and the load at the time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAST = ["bench_lifecycle.py", "bench_completion.py", "bench_models.py", "bench_progress.py", "bench_chat.py",
        "bench_top.py", "bench_loadgen.py", "bench_gateway.py"]


def main() -> int:
    failed = []
    for name in FAST:
        script = HERE / name
        if not script.exists():
            continue
        print(f"===== {name}", flush=True)
        code = subprocess.call([sys.executable, str(script)])
        if code != 0:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
