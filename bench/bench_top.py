"""CPU used by `sage-llm top` at 1 Hz with 4 engines (issue 3 budget: <= 3% of one core).

Four fake vLLM engines are started (only our own overhead is measured; they answer /metrics like vLLM) and kept busy
with a trickle of chat requests, so every frame has changing counters, histograms and sparklines. `top -n 1` runs in
a pseudo-terminal (full screen, as a person would run it) whose output is drained; after a warm-up, the CPU time of
the `top` process (user + system, all threads) is read over a window. The figure is the median over the runs.

Usage: python bench/bench_top.py [--runs 5] [--seconds 20] [--warmup 5]   (prints a JSON summary)
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, fake_env, free_port, machine, median

ENGINES = 4


def _trickle(ports: list[int], stop: threading.Event) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hello there"}], "stream": True}).encode()
    i = 0
    while not stop.wait(0.25):
        port = ports[i % len(ports)]
        i += 1
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                resp.read()
        except OSError:
            pass


def _drain(fd: int, counter: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        counter[0] += data.count(b"sage-llm top ")


def one_run(env: dict[str, str], seconds: float, warmup: float) -> dict:
    master, slave = pty.openpty()
    top_env = {**env, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
    top_env.pop("NO_COLOR", None)
    proc = subprocess.Popen([str(BIN / "sage-llm"), "top", "-n", "1"], stdin=slave, stdout=slave, stderr=slave,
                            env=top_env, close_fds=True)
    stop = threading.Event()
    frames = [0]
    drainer = threading.Thread(target=_drain, args=(master, frames, stop), daemon=True)
    drainer.start()
    try:
        p = psutil.Process(proc.pid)
        time.sleep(warmup)
        c0, f0, t0 = p.cpu_times(), frames[0], time.monotonic()
        time.sleep(seconds)
        c1, f1, t1 = p.cpu_times(), frames[0], time.monotonic()
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        return {"cpu_percent": round(100 * cpu / (t1 - t0), 2), "frames_per_s": round((f1 - f0) / (t1 - t0), 2),
                "rss_mib": round(p.memory_info().rss / 2**20, 1)}
    finally:
        os.write(master, b"q")
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop.set()
        os.close(slave)
        os.close(master)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = fake_env(Path(tmp) / "home")
        sage = str(BIN / "sage-llm")
        ports = [free_port() for _ in range(ENGINES)]
        for i, port in enumerate(ports):
            subprocess.run([sage, "start", f"bench/model-{i}", "--port", str(port), "--name", f"top{i}"],
                           env=env, check=True, capture_output=True)
        stop = threading.Event()
        load = threading.Thread(target=_trickle, args=(ports, stop), daemon=True)
        load.start()
        runs = []
        try:
            status = json.loads(subprocess.run([sage, "status", "--json"], env=env, capture_output=True,
                                               text=True).stdout)
            external = sum(not e["managed"] for e in status["engines"])
            for _ in range(args.runs):
                runs.append(one_run(env, args.seconds, args.warmup))
        finally:
            stop.set()
            subprocess.run([sage, "stop", "--all"], env=env, capture_output=True)
    cpu = [r["cpu_percent"] for r in runs]
    print(json.dumps({
        "benchmark": "sage-llm top -n 1, 4 fake engines under a request trickle",
        "machine": machine(),
        "external_engines_also_shown": external,
        "runs": runs,
        "cpu_percent_median": median(cpu),
        "cpu_percent_max": max(cpu),
        "budget_percent": 3.0,
        "within_budget": median(cpu) <= 3.0,
    }, indent=2))


if __name__ == "__main__":
    main()
