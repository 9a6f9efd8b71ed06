"""`sage llm run` as a real process (console script + fake vLLM): Ctrl-C, SIGTERM, stop from elsewhere, SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

SAGE_LLM = [sys.executable, "-c", "from sage_llm.cli.main import main; main()"]  # the `sage-llm` script


def sage(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*SAGE_LLM, *args], capture_output=True, text=True, timeout=timeout)


def managed(doc: str) -> list[dict]:
    return [e for e in json.loads(doc)["engines"] if e["managed"]]


class Run:
    def __init__(self, name: str, *extra: str) -> None:
        self.err_path = Path(os.environ["SAGE_LLM_HOME"]).parent / f"run-{name}.err"
        self.out_path = Path(os.environ["SAGE_LLM_HOME"]).parent / f"run-{name}.out"
        self.proc = subprocess.Popen([*SAGE_LLM, "run", "org/tiny", "--name", name, *extra],
                                     stdout=open(self.out_path, "w"), stderr=open(self.err_path, "w"))

    def err(self) -> str:
        return self.err_path.read_text()

    def out(self) -> str:
        return self.out_path.read_text()

    def wait_streaming(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "streaming its log" in self.err():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"run exited early ({self.proc.returncode}): {self.err()}")
            time.sleep(0.1)
        raise AssertionError(f"run never became ready: {self.err()}")

    def engine_pids(self, name: str) -> list[int]:
        doc = managed(sage("status", name, "--json").stdout)
        return [p["pid"] for p in doc[0]["processes"]] if doc else []


def gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_CHILDREN", "2")  # stand-ins for EngineCore and a worker, in the process group


@pytest.mark.usefixtures("fake_vllm", "stop_all", "children")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_run_stops_the_whole_group_and_removes_the_record(sig: signal.Signals) -> None:
    run = Run("fg")
    run.wait_streaming()
    pids = run.engine_pids("fg")
    assert len(pids) == 3  # the server and its two children
    # recorded like any engine while it runs: status from another process sees it ready
    eng = managed(sage("status", "--json").stdout)[0]
    assert eng["name"] == "fg"
    assert eng["state"] == "ready"
    run.proc.send_signal(sig)
    assert run.proc.wait(20) == 0
    assert gone(pids)
    assert managed(sage("status", "--json").stdout) == []
    assert f"{sig.name if sig == signal.SIGTERM else 'Ctrl-C'}" in run.err()
    assert "stopping engine 'fg'" in run.err()
    assert "stopped 'fg'" in run.err()


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_log_is_streamed_and_stop_from_elsewhere_ends_run() -> None:
    run = Run("fg")
    run.wait_streaming()
    port = managed(sage("status", "--json").stdout)[0]["port"]
    import urllib.request

    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
    time.sleep(0.5)
    assert sage("logs", "fg", "-n", "5").returncode == 0
    stopped = sage("stop", "fg")
    assert stopped.returncode == 0, stopped.stderr
    assert run.proc.wait(20) == 0
    assert "engine 'fg' was stopped" in run.err()
    assert '"GET /v1/models" 200' in run.out()  # the engine's log went to run's stdout
    assert "[shutdown] API server: shutdown triggered" in run.out()


@pytest.mark.usefixtures("fake_vllm", "stop_all", "children")
def test_sigkilled_run_leaves_a_recorded_engine_that_status_flags_and_stop_cleans() -> None:
    run = Run("fg")
    run.wait_streaming()
    pids = run.engine_pids("fg")
    run.proc.kill()
    run.proc.wait(10)
    time.sleep(0.5)
    eng = managed(sage("status", "--json").stdout)[0]
    assert eng["state"] == "ready"  # documented choice: the engine stays up, recorded
    assert "sage-llm run" in eng["error"]
    assert "sage-llm stop fg" in eng["error"]
    human = sage("status")
    assert "fg: its `sage-llm run`" in human.stderr
    assert sage("stop", "fg").returncode == 0
    assert gone(pids)


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_engine_dying_under_run_exits_1_with_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "ready:1.0")
    run = Run("fg")
    run.wait_streaming()
    assert run.proc.wait(20) == 1
    assert "engine 'fg' exited" in run.err()
    assert "fake engine crash after ready" in run.err()


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_run_refuses_like_start(monkeypatch: pytest.MonkeyPatch) -> None:
    res = sage("run", "org/tiny", "--gpu-memory-utilization", "1.5")
    assert res.returncode == 2
    assert "--gpu-memory-utilization" in res.stderr


@pytest.mark.usefixtures("fake_vllm", "stop_all", "children")
def test_ctrl_c_while_loading_stops_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "20")
    run = Run("fg")
    deadline = time.monotonic() + 20
    pids: list[int] = []
    while time.monotonic() < deadline and len(pids) < 3:
        pids = run.engine_pids("fg")
        time.sleep(0.2)
    assert len(pids) == 3, run.err()
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(20) == 130
    assert "interrupted while loading: stopping engine 'fg'" in run.err()
    assert gone(pids)
    assert managed(sage("status", "--json").stdout) == []


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_closed_stdout_ends_run_and_stops_the_engine(tmp_path: Path) -> None:
    import urllib.request

    err_path = tmp_path / "pipe.err"
    proc = subprocess.Popen([*SAGE_LLM, "run", "org/tiny", "--name", "fg"], stdout=subprocess.PIPE,
                            stderr=open(err_path, "w"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "streaming its log" not in err_path.read_text():
        time.sleep(0.1)
    eng = managed(sage("status", "--json").stdout)[0]
    pids = [p["pid"] for p in eng["processes"]]
    url = f"http://127.0.0.1:{eng['port']}/health"
    urllib.request.urlopen(url, timeout=5).read()
    assert proc.stdout is not None
    assert proc.stdout.readline()  # the log reaches our pipe
    proc.stdout.close()  # like `| head -1` exiting
    for _ in range(50):  # more log lines, so `run` writes into the closed pipe
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2).read()
        time.sleep(0.2)
    assert proc.wait(20) == 0
    assert "stdout closed: stopping engine 'fg'" in err_path.read_text()
    assert "Traceback" not in err_path.read_text()
    assert gone(pids)
    assert managed(sage("status", "--json").stdout) == []


@pytest.mark.usefixtures("fake_vllm", "stop_all", "children")
def test_signals_during_the_stop_do_not_abort_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM to `run`, then more SIGTERM, SIGHUP and SIGINT while it stops the engine: the stop still completes."""
    monkeypatch.setenv("FAKE_VLLM_IGNORE_TERM", "1")  # the engine ignores SIGTERM: the stop lasts the grace period
    monkeypatch.setenv("SAGE_LLM_STOP_TIMEOUT", "8")  # then SIGKILL
    record = Path(os.environ["SAGE_LLM_HOME"]) / "engines" / "fg.json"
    run = Run("fg")
    run.wait_streaming()
    pids = run.engine_pids("fg")
    assert len(pids) == 3
    run.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and json.loads(record.read_text())["state"] != "stopping":
        time.sleep(0.05)
    assert json.loads(record.read_text())["state"] == "stopping", run.err()
    assert "SIGTERM received: stopping engine 'fg'; further signals are ignored until it is down" in run.err()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        run.proc.send_signal(sig)
    # they arrived during the stop: the engine (ignoring SIGTERM) is still there and so is its record
    assert json.loads(record.read_text())["state"] == "stopping"
    assert run.proc.wait(60) == 0, run.err()
    assert gone(pids)
    assert not record.exists()
    assert "stopped 'fg' (SIGKILL after the grace period)" in run.err()
    assert "Traceback" not in run.err()
    assert managed(sage("status", "--json").stdout) == []
