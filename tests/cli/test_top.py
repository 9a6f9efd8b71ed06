"""`sage llm top`: frames rendered to a string console (fake NVML + the fake vLLM's /metrics), and the live loop in a
pseudo-terminal (q and Ctrl-C quit, the terminal is restored)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
import urllib.request

import psutil
import pytest
from rich.console import Console

from sage_llm.cli.commands.top import render
from sage_llm.engine.monitor import Monitor, sparkline
from sage_llm.observe import gpu

try:
    from tests.fakes.fake_nvml import FakeGpu, FakeNVML, FakeProc, GiB
except ModuleNotFoundError:  # tests/ not a package: its conftest put tests/ itself on sys.path
    from fakes.fake_nvml import FakeGpu, FakeNVML, FakeProc, GiB


def text_of(frame, width: int = 220) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(render(frame))
    return buf.getvalue()


def chat(port: int, text: str = "hi there", stream: bool = True) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": text}], "stream": stream}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_sparkline() -> None:
    pts = [(float(t), float(t)) for t in range(0, 8)]
    assert sparkline(pts, 8, 8.0, 8.0) == "▁▂▃▄▅▆▇█"
    assert sparkline(pts, 8, 8.0, 8.0, top=14.0) == "▁▂▂▃▃▄▄▅"  # scaled to a fixed top (e.g. GPU memory total)
    assert sparkline([(7.5, 3.0)], 4, 8.0, 8.0) == "   █"  # blanks where there is no sample
    assert sparkline([(1.0, 0.0), (7.0, 0.0)], 2, 8.0, 8.0) == "▁▁"
    assert sparkline([(-50.0, 9.0)], 3, 8.0, 8.0) == "   "  # older than the span
    assert sparkline(pts, 0, 8.0, 8.0) == ""


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_frame_with_gpus_and_a_busy_engine(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_CHILDREN", "1")
    nv = FakeNVML([FakeGpu(total=80 * GiB, used=30 * GiB, util=87, temp=61, power_mw=312_000, limit_mw=700_000),
                   FakeGpu(total=24 * GiB, used=1 * GiB, name="NVIDIA L4", util=None, temp=None, power_mw=None)])
    gpu.set_backend(nv)
    code, out, err = cli("start", "org/tiny", "--name", "busy", "--json", "-u", "0.3", "--gpus", "0")
    assert code == 0, err
    doc = json.loads(out)
    port = doc["port"]
    (child,) = psutil.Process(doc["pid"]).children(recursive=True)
    nv.processes = {0: [FakeProc(child.pid, 29 * GiB)]}

    clock = Clock()
    mon = Monitor(interval=1.0, history_s=300.0, clock=clock, include_external=False)
    try:
        first = mon.tick()
        (row,) = first.engines
        assert row.generation_tps is None  # nothing to compare with yet
        for _ in range(4):
            chat(port)  # 5 generated tokens each ("Hello from the fake vLLM.") and 6 prompt tokens
        clock.t += 2.0
        frame = mon.tick()
    finally:
        mon.close()
    (row,) = frame.engines
    assert (row.name, row.state, row.port, row.gpus) == ("busy", "ready", port, [0])
    assert row.vram_bytes == 29 * GiB
    assert row.generation_tps == pytest.approx(10.0)  # 20 tokens in 2 s
    assert row.prompt_tps == pytest.approx(12.0)
    assert row.ttft_p50_s is not None
    assert row.ttft_recent is True
    assert (row.running, row.waiting, row.kv_cache_usage) == (0.0, 0.0, 0.0)

    screen = text_of(frame)
    gpu_line = next(ln for ln in screen.splitlines() if ln.startswith("0 "))
    assert "H100 80GB HBM3" in gpu_line
    assert "87%" in gpu_line
    assert "30.0/80.0" in gpu_line
    assert "61°C" in gpu_line
    assert "312/700 W" in gpu_line
    l4_line = next(ln for ln in screen.splitlines() if ln.startswith("1 "))
    assert "L4" in l4_line
    assert "1.0/24.0" in l4_line
    assert "°C" not in l4_line  # temperature not supported: "-"
    eng_line = next(ln for ln in screen.splitlines() if ln.startswith("busy"))
    for cell in ("ready", "org/tiny", str(port), "29.0", "10.0", "12.0", " ms"):
        assert cell in eng_line, (cell, eng_line)
    assert "ENGINE" in screen
    assert "GEN t/s, last 5 min" in screen
    assert "1 engine(s), 1 ready, 2 GPU(s)" in screen
    assert "▁" in gpu_line or "▂" in gpu_line or "▄" in gpu_line  # the memory sparkline has samples


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_frame_without_gpu_says_why(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "DRIVER_MARKERS", ("/nonexistent",))
    gpu.reset()
    code, _out, err = cli("start", "org/tiny", "--name", "cpu-one")
    assert code == 0, err
    mon = Monitor(include_external=False)
    try:
        screen = text_of(mon.tick())
    finally:
        mon.close()
    assert f"No GPU: {gpu.NO_DRIVER}" in screen
    line = next(ln for ln in screen.splitlines() if ln.startswith("cpu-one"))
    assert "ready" in line
    assert "org/tiny" in line


def test_frame_with_no_engines() -> None:
    gpu.set_backend(FakeNVML([FakeGpu()]))
    mon = Monitor(include_external=False)
    try:
        screen = text_of(mon.tick())
    finally:
        mon.close()
    assert "No engines. Start one: sage-llm start MODEL" in screen
    assert "0 engine(s), 0 ready, 1 GPU(s)" in screen


def test_a_dead_metrics_endpoint_is_shown_and_triggers_rediscovery(home) -> None:
    from sage_llm.engine.view import EngineView

    gpu.set_backend(FakeNVML([]))
    mon = Monitor(include_external=False, fetch=lambda host, port, timeout: (_ for _ in ()).throw(
        ConnectionRefusedError("refused")))
    mon.views = [EngineView(name="gone", managed=True, state="ready", port=1, host="127.0.0.1")]
    mon._discovered_at = mon.clock()  # as if just discovered
    try:
        mon._discover = lambda now: None  # keep the hand-made view
        frame = mon.tick()
    finally:
        mon.close()
    (row,) = frame.engines
    assert "ConnectionRefusedError" in (row.metrics_error or "")
    assert mon._discovered_at is None
    assert "ready (no metrics)" in text_of(frame)


def test_once_prints_a_frame_and_bad_options(cli) -> None:
    gpu.set_backend(FakeNVML([FakeGpu(name="NVIDIA A100-SXM4-40GB", total=40 * GiB)]))
    code, out, err = cli("top", "--once", "-n", "0.1")
    assert code == 0, err
    assert "A100-SXM4-40GB" in out
    assert out.startswith("sage-llm top ")  # (other vLLMs on this machine may show up as external engines)
    code, _out, err = cli("top")  # stdout is not a terminal here
    assert code == 2
    assert "`top` needs a terminal" in err
    code, _out, err = cli("top", "-n", "0")
    assert code == 2
    assert "-n 0 is too short" in err


def _spawn_top(home, *args: str) -> tuple[subprocess.Popen, int, int]:
    master, slave = pty.openpty()
    env = {**os.environ, "SAGE_LLM_HOME": str(home), "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "sage_llm", "top", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    return proc, master, slave


def _read_until(master: int, proc: subprocess.Popen, needle: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                buf += os.read(master, 65536)
            except OSError:
                break
        elif proc.poll() is not None:
            break  # exited and nothing more to read
        if needle in buf:
            break
    return buf


@pytest.mark.parametrize("how", ["q", "sigint", "sigterm"])
def test_live_loop_quits_and_restores_the_terminal(home, how: str) -> None:
    proc, master, slave = _spawn_top(home, "-n", "0.2")
    before = termios.tcgetattr(slave)
    try:
        seen = _read_until(master, proc, b"q: quit", timeout=60)
        assert b"\x1b[?1049h" in seen  # the alternate screen
        assert b"sage-llm top" in seen
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # keys one by one while it runs
        if how == "q":
            os.write(master, b"q")
        else:
            proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        rest = _read_until(master, proc, b"\x1b[?1049l", timeout=5)
        assert b"\x1b[?1049l" in seen + rest  # left the alternate screen
        assert termios.tcgetattr(slave)[3] == before[3]  # echo and line mode are back
        assert b"Traceback" not in seen + rest
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        os.close(slave)
