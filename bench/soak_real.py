"""Real-vLLM soak (issue 6): N start/stop cycles of the CPU engine with the tiny model.

Checks after every cycle: zero processes of the engine left (by session id and by the engine id in their
environment), the port not bound, the record removed; and that the CLI's own peak memory stays flat across cycles.
Needs the engine (`make engine`) and builds the tiny model into .cache/tiny-hub if it is not there yet.

Usage: SAGE_LLM_ENGINE_DIR=.engines/cpu python bench/soak_real.py [--cycles 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, machine  # noqa: E402

sys.path.insert(0, str(ROOT))  # the test support package (tests/support), not shipped in the wheel
from tests.support.tiny import TINY_REPO, build_tiny_model  # noqa: E402


def wait4_run(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str, int]:
    r, w = os.pipe()
    er, ew = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        os.dup2(ew, 2)
        os.close(r)
        os.close(er)
        os.execve(cmd[0], cmd, env)
    os.close(w)
    os.close(ew)
    out = b""
    err = b""
    with os.fdopen(r, "rb") as fo, os.fdopen(er, "rb") as fe:
        out = fo.read()
        err = fe.read()
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(), err.decode(), usage.ru_maxrss


def leftovers(engine_ids: set[str]) -> list[int]:
    left = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("SAGE_LLM_ENGINE_ID") in engine_ids and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
        except psutil.Error:
            continue
    return left


def port_bound(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--port", type=int, default=None, help="default: a free port (bench/_common.py)")
    args = ap.parse_args()
    args.port = args.port or free_port()
    engine_dir = Path(os.environ.get("SAGE_LLM_ENGINE_DIR", ROOT / ".engines" / "cpu"))
    cache = ROOT / ".cache" / "tiny-hub"
    build_tiny_model(cache, engine_dir / "bin" / "python", TINY_REPO)
    sage = str(Path(sys.executable).parent / "sage-llm")
    cycles = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, SAGE_LLM_HOME=str(Path(tmp) / "home"), SAGE_LLM_VLLM=str(engine_dir / "bin" / "vllm"),
                   HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", NO_COLOR="1")
        ids: set[str] = set()
        for i in range(args.cycles):
            t0 = time.monotonic()
            code, out, err, rss_start = wait4_run([sage, "start", TINY_REPO, "--name", "soak", "--port",
                                                   str(args.port), "--enforce-eager", "--timeout", "300"], env)
            t_ready = time.monotonic() - t0
            if code != 0:
                raise SystemExit(f"cycle {i}: start failed: {err[-2000:]}")
            rec = json.loads((Path(tmp) / "home" / "engines" / "soak.json").read_text())
            ids.add(rec["id"])
            tree = [p.pid for p in psutil.process_iter(["pid"]) if p.pid == rec["pid"] or
                    (p.info["pid"] and _sid(p.pid) == rec["pid"])]
            t1 = time.monotonic()
            code, out, err, rss_stop = wait4_run([sage, "stop", "soak"], env)
            t_stop = time.monotonic() - t1
            if code != 0:
                raise SystemExit(f"cycle {i}: stop failed: {err[-2000:]}")
            left = leftovers(ids)
            cycles.append({"cycle": i, "ready_s": round(t_ready, 2), "stop_s": round(t_stop, 2),
                           "cycle_s": round(time.monotonic() - t0, 2), "tree_size": len(tree),
                           "leaked_processes": len(left), "port_bound": port_bound(args.port),
                           "record_left": (Path(tmp) / "home" / "engines" / "soak.json").exists(),
                           "cli_rss_start_kib": rss_start, "cli_rss_stop_kib": rss_stop})
            print(json.dumps(cycles[-1]), flush=True)
    summary = {
        "machine": machine(), "cycles": len(cycles),
        "cycle_median_s": statistics.median(c["cycle_s"] for c in cycles),
        "ready_median_s": statistics.median(c["ready_s"] for c in cycles),
        "stop_median_s": statistics.median(c["stop_s"] for c in cycles),
        "leaked_processes_total": sum(c["leaked_processes"] for c in cycles),
        "ports_left_bound": sum(c["port_bound"] for c in cycles),
        "records_left": sum(c["record_left"] for c in cycles),
        "cli_rss_start_kib_first_last": [cycles[0]["cli_rss_start_kib"], cycles[-1]["cli_rss_start_kib"]],
        "cli_rss_stop_kib_first_last": [cycles[0]["cli_rss_stop_kib"], cycles[-1]["cli_rss_stop_kib"]],
    }
    print(json.dumps(summary, indent=2))


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


if __name__ == "__main__":
    main()
