"""`sage llm logs -f` as a real process: Ctrl-C ends it cleanly and leaves the engine running."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

SAGE_LLM = [sys.executable, "-c", "from sage_llm.cli.main import main; main()"]  # the `sage-llm` script


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_ctrl_c_ends_follow_and_the_engine_keeps_running() -> None:
    assert subprocess.run([*SAGE_LLM, "start", "org/tiny", "--name", "one"], capture_output=True,
                          timeout=60).returncode == 0
    proc = subprocess.Popen([*SAGE_LLM, "logs", "one", "-f", "-n", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = ""
    while "following" not in seen:  # it says so when it starts to follow (a process that ends reads "" and fails)
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    err = seen + err
    assert proc.returncode == 0, err
    assert len(out.splitlines()) >= 2
    assert "following" in err
    assert "stopped following (Ctrl-C); the engine keeps running" in err
    assert "Traceback" not in err
    status = subprocess.run([*SAGE_LLM, "status", "one", "--json"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0
    assert json.loads(status.stdout)["engines"][0]["state"] == "ready"


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_since_without_n_shows_every_line_since() -> None:
    assert subprocess.run([*SAGE_LLM, "start", "org/tiny", "--name", "one"], capture_output=True,
                          timeout=60).returncode == 0
    res = subprocess.run([*SAGE_LLM, "logs", "one", "--since", "1h"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    first = next(ln for ln in lines if ln.strip())
    assert first.startswith("===== sage llm start one at ")  # the whole run, from our header on
    assert any("Starting vLLM server on" in ln for ln in lines)
    res2 = subprocess.run([*SAGE_LLM, "logs", "one", "--since", "1h", "-n", "3"], capture_output=True, text=True,
                          timeout=60)
    assert res2.stdout.splitlines() == lines[-3:]
