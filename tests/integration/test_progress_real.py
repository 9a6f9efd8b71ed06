"""Load stages, logs, diagnosis, `run` and the audit log against the real CPU build of vLLM and the tiny model.

One engine at a time (each takes 25-60 s to start on 2 shared cores); every test stops what it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

SAGE_LLM = [sys.executable, "-c", "from sage_llm.cli.main import main; main()"]  # the `sage-llm` script


def managed(doc: str) -> list[dict]:
    return [e for e in json.loads(doc)["engines"] if e["managed"]]


@pytest.mark.usefixtures("stop_all")
def test_real_engine_stages_logs_and_audit(cli, real_vllm, tiny_model) -> None:
    port = free_port("real")
    code, _out, err = cli("start", tiny_model, "--name", "tiny", "--port", str(port), "--enforce-eager",
                          "--max-model-len", "512", "--no-wait")
    assert code == 0, err
    seen: list[tuple[str, float | None]] = []
    deadline = time.monotonic() + 300
    eng: dict = {}
    while time.monotonic() < deadline:
        eng = managed(cli("status", "tiny", "--json")[1])[0]
        if not seen or seen[-1] != (eng["stage"], eng["progress"]):
            seen.append((eng["stage"], eng["progress"]))
        if eng["state"] in ("ready", "failed"):
            break
        time.sleep(0.3)
    assert eng["state"] == "ready", (eng, seen)
    stages = [s for s, _ in seen]
    assert stages[-1] == "ready"
    assert eng["progress"] == 1.0
    # while starting, status saw real stages from vLLM's log, in order
    order = ["launching", "resolving", "downloading", "loading_weights", "compiling", "kv_cache", "cuda_graphs",
             "starting_server", "ready"]
    ranks = [order.index(s) for s in stages]
    assert ranks == sorted(ranks), seen
    assert len(set(stages) - {"ready"}) >= 2, seen

    code, out, _ = cli("logs", "-n", "400")  # one engine: no name needed
    assert code == 0
    assert "Starting vLLM server on" in out
    code, out, _ = cli("logs", "tiny", "--since", "10m")
    assert code == 0
    assert "Resolved architecture" in out

    assert cli("stop", "tiny")[0] == 0
    entries = json.loads(cli("logs", "--audit", "--json")[1])["entries"]
    assert [(e["command"], e["outcome"]) for e in entries] == [("start", "ok"), ("stop", "ok")]
    assert entries[0]["result"]["engine"] == "tiny"


@pytest.mark.usefixtures("stop_all")
def test_real_engine_failure_is_diagnosed_and_recorded(cli, real_vllm, tiny_model) -> None:
    port = free_port("real")
    # longer than the model's config allows: sage cannot know, vLLM refuses while resolving the config
    code, _out, err = cli("start", tiny_model, "--name", "tiny", "--port", str(port), "--enforce-eager",
                          "--max-model-len", "4000000", "--timeout", "300")
    assert code == 1, err
    assert "--max-model-len 4000000 is longer than the model supports" in err
    assert "start again with --max-model-len" in err
    eng = managed(cli("status", "--json")[1])[0]
    assert eng["state"] == "failed"
    assert "exited during startup: --max-model-len 4000000 is longer than the model supports" in eng["error"]
    assert "(hint: start again with --max-model-len" in eng["error"]


@pytest.mark.usefixtures("stop_all")
def test_real_engine_run_in_the_foreground_and_ctrl_c(real_vllm, tiny_model, tmp_path: Path) -> None:
    port = free_port("real")
    err_path = tmp_path / "run.err"
    out_path = tmp_path / "run.out"
    proc = subprocess.Popen([*SAGE_LLM, "run", tiny_model, "--name", "fg", "--port", str(port), "--enforce-eager",
                             "--max-model-len", "512"], stdout=open(out_path, "w"), stderr=open(err_path, "w"))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "streaming its log" not in err_path.read_text():
            assert proc.poll() is None, err_path.read_text()
            time.sleep(0.5)
        err = err_path.read_text()
        assert "streaming its log" in err, err
        assert "fg: loading weights" in err  # plain progress lines (stderr is a file)
        assert "fg loaded in" in err
        status = subprocess.run([*SAGE_LLM, "status", "fg", "--json"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        pids = [p["pid"] for p in managed(status.stdout)[0]["processes"]]
        assert len(pids) >= 3  # APIServer, VLLM::EngineCore, VLLM::Worker
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_path.read_text()
    assert "stopping engine 'fg'" in err
    assert "stopped 'fg'" in err
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
    assert not (Path(os.environ["SAGE_LLM_HOME"]) / "engines" / "fg.json").exists()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
