"""Progress parsing and log reading costs.

1. Progress parsing while an engine loads: a real vLLM log (tests/fixtures/vllm-logs/cpu-compiled.log, a 34 s
   start with torch.compile) is replayed into a file at 10x speed by a separate writer process, keeping the gaps
   between its lines; meanwhile `LoadProgress.poll()` runs every 0.25 s (the rate `start --wait` redraws at) and
   every 0.05 s (wait_ready's own poll rate, the worst case). The CPU time of the polling thread divided by the
   wall time is the share of one core it adds. Budget: <= 2 %.
2. `sage-llm logs -n 100` on a 1 GB log: `logs.tail(path, 100)` in-process, and the whole command as a fresh
   process. Budget: <= 100 ms for the read.

Usage: .venv/bin/python bench/bench_progress.py [--runs 5] [--big /tmp/dir] [--keep-big]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine

from sage_llm.observe import logs
from sage_llm.observe.progress import LoadProgress

LOG = ROOT / "tests" / "fixtures" / "vllm-logs" / "cpu-compiled.log"
_TS = re.compile(rb"\d\d-\d\d (\d\d):(\d\d):(\d\d) \[")


def timed_lines(data: bytes) -> list[tuple[float, bytes]]:
    """(seconds since the first line, raw line with its separator); lines without a time get the last one."""
    out: list[tuple[float, bytes]] = []
    t0 = None
    last = 0.0
    for raw in data.splitlines(keepends=True):
        m = _TS.search(raw)
        if m:
            t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
            t0 = t if t0 is None else t0
            last = float(t - t0)
        out.append((last, raw))
    return out


def writer(path: str, speed: float, started: float) -> None:
    lines = timed_lines(LOG.read_bytes())
    with open(path, "ab", buffering=0) as fh:
        for t, raw in lines:
            delay = started + t / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            fh.write(raw)


def replay(interval: float, speed: float = 10.0) -> tuple[float, float, float, str]:
    """Returns (cpu seconds of the poller, wall seconds, share of one core, final stage)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "engine.log")
        Path(path).write_bytes(b"")
        started = time.monotonic() + 0.2
        proc = multiprocessing.get_context("spawn").Process(target=writer, args=(path, speed, started))
        proc.start()
        lp = LoadProgress(path, offset=0, model="sage-test/tiny-llama")  # also watches the HF cache
        result: dict[str, float | str] = {}

        def poller() -> None:
            cpu0 = time.thread_time()
            wall0 = time.monotonic()
            while proc.is_alive():
                lp.poll()
                time.sleep(interval)
            lp.poll()
            result["cpu"] = time.thread_time() - cpu0
            result["wall"] = time.monotonic() - wall0

        t = threading.Thread(target=poller)
        t.start()
        t.join()
        proc.join()
        cpu, wall = float(result["cpu"]), float(result["wall"])
        return cpu, wall, cpu / wall, lp.snapshot.stage


def make_big(path: Path, size: int) -> None:
    """A 1 GB log made of real vLLM lines (the reference logs repeated)."""
    chunk = b"".join(p.read_bytes() for p in sorted((ROOT / "tests" / "fixtures" / "vllm-logs").glob("cpu-*.log")))
    block = chunk * max(1, (4 << 20) // len(chunk))
    with open(path, "wb") as fh:
        written = 0
        while written < size:
            fh.write(block)
            written += len(block)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--big", default=None, help="directory for the 1 GB file (default: a temp dir)")
    ap.add_argument("--keep-big", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f}")

    for interval in (0.25, 0.05):
        shares, cpus, walls = [], [], []
        stage = ""
        for _ in range(args.runs):
            cpu, wall, share, stage = replay(interval)
            shares.append(share)
            cpus.append(cpu)
            walls.append(wall)
        print(f"progress parsing, poll every {interval * 1000:.0f} ms, replay at 10x ({args.runs} runs): "
              f"median {statistics.median(shares) * 100:.3f} % of one core (max {max(shares) * 100:.3f} %), "
              f"cpu {statistics.median(cpus) * 1000:.1f} ms over {statistics.median(walls):.2f} s, "
              f"final stage {stage}")

    big_dir = Path(args.big) if args.big else Path(tempfile.mkdtemp())
    big = big_dir / "big.log"
    if not big.exists() or big.stat().st_size < (1 << 30):
        t = time.perf_counter()
        make_big(big, 1 << 30)
        print(f"wrote {big} ({big.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s")
    try:
        reads = []
        for _ in range(max(args.runs, 7)):
            t = time.perf_counter()
            got = logs.tail(big, 100)
            reads.append(time.perf_counter() - t)
        assert len(got) == 100
        print(f"logs.tail(1 GB, 100), in-process ({len(reads)} runs): median {statistics.median(reads) * 1000:.2f} ms,"
              f" max {max(reads) * 1000:.2f} ms")
        # the whole command: a fresh process, with an engine record pointing at the big log
        home = Path(tempfile.mkdtemp())
        env = dict(os.environ, SAGE_LLM_HOME=str(home), NO_COLOR="1")
        (home / "engines").mkdir(parents=True, mode=0o700)
        (home / "logs").mkdir(mode=0o700)
        os.chmod(home, 0o700)
        (home / "logs" / "big.log").symlink_to(big)
        cmd = [sys.executable, "-m", "sage_llm", "logs", "big", "-n", "100"]
        runs = []
        for _ in range(max(args.runs, 5)):
            t = time.perf_counter()
            res = subprocess.run(cmd, env=env, capture_output=True, check=False)
            runs.append(time.perf_counter() - t)
            assert res.returncode == 0, res.stderr.decode()
            assert len(res.stdout.splitlines()) == 100
        base = []
        for _ in range(max(args.runs, 5)):  # the same process start without the read: `logs --help`
            t = time.perf_counter()
            subprocess.run([*cmd[:4], "--help"], env=env, capture_output=True, check=False)
            base.append(time.perf_counter() - t)
        print(f"`sage-llm logs big -n 100` on 1 GB, fresh process ({len(runs)} runs): median "
              f"{statistics.median(runs) * 1000:.0f} ms, max {max(runs) * 1000:.0f} ms; `sage-llm logs --help` "
              f"(interpreter + CLI start, no read): median {statistics.median(base) * 1000:.0f} ms")
    finally:
        if not args.keep_big and not args.big:
            big.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
