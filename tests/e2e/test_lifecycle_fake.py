"""start / status / stop through the real CLI entry against the fake vLLM (fast tier)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import FAKE_VLLM
from tests.support.discipline import wait_for
from tests.support.ports import free_port

SCHEMA = Path(__file__).resolve().parents[2] / "src" / "sage_llm" / "data" / "status.schema.json"


def status_doc(cli, *args: str) -> dict:
    code, out, err = cli("status", "--json", *args)
    doc = json.loads(out)
    import jsonschema

    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    return doc


def engine(doc: dict, name: str) -> dict:
    return next(e for e in doc["engines"] if e["name"] == name)


@pytest.fixture
def started(cli, fake_vllm, stop_all):
    port = free_port()
    code, out, err = cli("start", "org/Tiny-Chat", "--port", str(port))
    assert code == 0, err
    return port


def test_start_status_stop(cli, started, home):
    doc = status_doc(cli)
    e = engine(doc, "tiny-chat")
    assert e["state"] == "ready"
    assert e["managed"] is True
    assert e["port"] == started
    assert e["base_url"] == f"http://127.0.0.1:{started}/v1"
    assert e["served_model_name"] == "org/Tiny-Chat"
    assert e["max_model_len"] == 2048
    assert e["error"] is None
    assert doc["local_engine"]["running"] is True
    assert doc["local_engine"]["port"] == started
    assert doc["local_engine"]["model"] == "org/Tiny-Chat"
    assert doc["local_engine"]["gpu_memory_usage"] is None
    assert isinstance(doc["local_engine"]["uptime"], str)
    rec = json.loads((home / "engines" / "tiny-chat.json").read_text())
    for key in ("name", "model", "served_model_name", "host", "port", "pid", "create_time", "settings", "log_file",
                "started_at"):
        assert rec[key] not in (None, ""), key
    pid = rec["pid"]
    code, out, err = cli("status", "tiny-chat")
    assert code == 0
    assert "ready" in out
    code, out, err = cli("stop", "tiny-chat")
    assert code == 0, err
    assert "stopped 'tiny-chat'" in out
    assert not (home / "engines" / "tiny-chat.json").exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", started))  # the port is free again
    code, out, err = cli("status", "tiny-chat")
    assert code == 3
    doc = status_doc(cli)
    assert all(e["managed"] is False for e in doc["engines"])
    # other vLLM servers on this machine are legitimately listed as external; ours must be gone
    if not any(e["state"] == "ready" for e in doc["engines"]):
        assert doc["local_engine"] == {"running": False, "port": None, "model": None, "pid": None,
                                       "gpu_memory_usage": None, "uptime": None}
    assert doc["local_engine"]["port"] != started


def test_start_is_idempotent_for_same_model(cli, started):
    code, out, err = cli("start", "org/Tiny-Chat", "--port", str(started))
    assert code == 0
    assert "already serves" in out
    code, out, err = cli("start", "org/Tiny-Chat")
    assert code == 0
    assert "already serves" in out
    assert len([e for e in status_doc(cli)["engines"] if e["managed"]]) == 1


def test_name_clash_gets_suffix_and_explicit_clash_is_refused(cli, started):
    code, out, err = cli("start", "other/tiny-chat")  # same slug, different model
    assert code == 0, err
    assert "'tiny-chat-2'" in out
    code, out, err = cli("start", "third/x", "--name", "tiny-chat")
    assert code == 2
    assert "already runs org/Tiny-Chat" in err


def test_explicit_busy_port_is_refused_and_owner_untouched(cli, fake_vllm, home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        code, out, err = cli("start", "org/x", "--port", str(port))
        assert code == 1
        assert f"port {port} is already in use" in err
        assert len(err.strip().splitlines()) == 1
        assert not (home / "engines" / "x.json").exists()
        s.settimeout(0.2)
        conn = socket.create_connection(("127.0.0.1", port), timeout=1)  # still listening, untouched
        conn.close()


def test_auto_port_skips_busy_one(cli, fake_vllm, monkeypatch, stop_all):
    with socket.socket() as s:
        for _ in range(20):  # another program on the machine may take a free port before we bind it: take another
            busy = free_port(span=3)  # this one held below, the next ones reserved for the engine that skips it
            try:
                s.bind(("127.0.0.1", busy))
                break
            except OSError:
                continue
        s.listen(1)
        monkeypatch.setenv("SAGE_LOCAL_ENGINE_PORT", str(busy))
        code, out, err = cli("start", "org/auto")
        assert code == 0, err
        assert f"port {busy} is busy; using {busy + 1}" in err or f"port {busy} is busy" in err
        assert engine(status_doc(cli), "auto")["port"] > busy


def test_crash_during_load_fails_cleanly(cli, fake_vllm, monkeypatch, home):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "load")
    monkeypatch.setenv("FAKE_VLLM_CHILDREN", "1")
    code, out, err = cli("start", "org/bad", "--port", str(free_port()))
    assert code == 1
    assert "exited during startup" in err
    assert "last log lines" in err
    rec = json.loads((home / "engines" / "bad.json").read_text())
    assert rec["state"] == "failed"
    assert "exited during startup" in rec["error"]
    doc = status_doc(cli)
    e = engine(doc, "bad")
    assert e["state"] == "failed"
    assert e["error"]
    assert e["processes"] == []
    code, out, err = cli("stop", "bad")
    assert code == 0
    assert not (home / "engines" / "bad.json").exists()


def test_timeout_stops_the_engine(cli, fake_vllm, monkeypatch, home):
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "30")
    code, out, err = cli("start", "org/slow", "--port", str(free_port()), "--timeout", "1")
    assert code == 1
    assert "not ready after 1 s" in err
    rec = json.loads((home / "engines" / "slow.json").read_text())
    assert rec["state"] == "failed"
    assert not psutil.pid_exists(rec["pid"]) or psutil.Process(rec["pid"]).status() == psutil.STATUS_ZOMBIE


def test_crash_after_ready_shows_failed(cli, fake_vllm, monkeypatch, stop_all):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "ready:0.5")
    code, out, err = cli("start", "org/flaky", "--port", str(free_port()))
    assert code == 0
    e = wait_for(lambda: (e := engine(status_doc(cli), "flaky"))["state"] == "failed" and e, 30, interval=0.2,
                 what="the engine that crashed after ready to show as failed")
    assert "exited unexpectedly" in e["error"]
    code, out, err = cli("status", "flaky")
    assert code == 3


def test_sigterm_ignored_is_escalated(cli, fake_vllm, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_IGNORE_TERM", "1")
    monkeypatch.setenv("FAKE_VLLM_CHILDREN", "2")
    code, out, err = cli("start", "org/stubborn", "--port", str(free_port()))
    assert code == 0
    doc = status_doc(cli)
    pids = [p["pid"] for p in engine(doc, "stubborn")["processes"]]
    assert len(pids) == 3
    t = time.monotonic()
    code, out, err = cli("stop", "stubborn", "--timeout", "1")
    assert code == 0, err
    assert "SIGKILL" in out
    assert time.monotonic() - t < 8
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_orphans_after_api_server_sigkill(cli, fake_vllm, monkeypatch, home):
    monkeypatch.setenv("FAKE_VLLM_CHILDREN", "2")
    code, out, err = cli("start", "org/orph", "--port", str(free_port()))
    assert code == 0
    doc = status_doc(cli)
    procs = engine(doc, "orph")["processes"]
    leader = engine(doc, "orph")["pid"]
    os.kill(leader, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(leader) or psutil.Process(leader).status() == psutil.STATUS_ZOMBIE, 30,
             what="the SIGKILLed API server to exit")
    e = engine(status_doc(cli), "orph")
    assert e["state"] == "failed"
    assert "left" in e["error"]
    assert len(e["processes"]) == 2
    code, out, err = cli("stop", "orph")
    assert code == 0, err
    for p in procs:
        assert not psutil.pid_exists(p["pid"]) or psutil.Process(p["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not (home / "engines" / "orph.json").exists()


def test_pid_reused_by_unrelated_process_is_never_signalled(cli, fake_vllm, home):
    other = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
    try:
        store_dir = home / "engines"
        store_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        rec = {"name": "ghost", "model": "org/g", "served_model_name": "org/g", "host": "127.0.0.1",
               "port": free_port(), "pid": other.pid, "create_time": psutil.Process(other.pid).create_time() - 500,
               "id": "ghost-id", "log_file": str(home / "logs" / "ghost.log"), "started_at": "2026-01-01T00:00:00Z",
               "state": "running"}
        (store_dir / "ghost.json").write_text(json.dumps(rec))
        e = engine(status_doc(cli), "ghost")
        assert e["state"] in ("failed", "stopped")
        assert "another process" in e["error"]
        code, out, err = cli("stop", "ghost")
        assert code == 0
        assert other.poll() is None, "an unrelated process was signalled"
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("content", ["", "{not json", '{"name": "bad", "schema_version": "7"}'])
def test_corrupt_record_does_not_break_status(cli, home, content):
    (home / "engines").mkdir(parents=True)
    os.chmod(home, 0o700)
    (home / "engines" / "bad.json").write_text(content)
    code, out, err = cli("status", "--json")
    assert code == 0
    doc = json.loads(out)
    e = engine(doc, "bad")
    assert e["state"] == "failed"
    assert e["error"]
    assert "Warning:" in err
    code, out, err = cli("status")
    assert code == 0
    code, out, err = cli("stop", "bad")
    assert code == 1
    assert "corrupt" in err
    assert (home / "engines" / "bad.json").exists()
    code, out, err = cli("stop", "bad", "--force")
    assert code == 0
    assert not (home / "engines" / "bad.json").exists()


def test_hung_engine_does_not_slow_status(cli, fake_vllm, monkeypatch, stop_all):
    monkeypatch.setenv("FAKE_VLLM_HANG", "1")
    hang_port = free_port()
    code, out, err = cli("start", "org/hang", "--port", str(hang_port), "--no-wait")
    assert code == 0

    def listening() -> bool:  # it accepts connections, and never answers
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", hang_port)) == 0
    wait_for(listening, 30, what=f"the hung engine to listen on {hang_port}")
    monkeypatch.delenv("FAKE_VLLM_HANG")
    code, out, err = cli("start", "org/fine", "--port", str(free_port()))
    assert code == 0
    t = time.monotonic()
    doc = status_doc(cli)
    took = time.monotonic() - t
    assert engine(doc, "hang")["state"] == "unhealthy"
    assert "no answer" in engine(doc, "hang")["error"]
    assert engine(doc, "fine")["state"] == "ready"
    assert took < 2.0, took


def test_quiet_lists_names(cli, started):
    code, out, err = cli("status", "-q")
    assert out.split() == ["tiny-chat"]


def test_external_vllm_is_listed_unmanaged(cli, home, monkeypatch):
    port = free_port()
    env = dict(os.environ, FAKE_VLLM_LOAD_S="0.1")
    proc = subprocess.Popen([sys.executable, str(FAKE_VLLM), "serve", "hand/started", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def ready() -> dict | None:
            e = next((x for x in status_doc(cli)["engines"] if x["port"] == port), None)
            return e if e and e["state"] == "ready" else None
        e = wait_for(ready, 30, interval=0.2, what=f"the external engine on {port} to show as ready")
        assert e["managed"] is False
        assert e["state"] == "ready"
        assert e["pid"] == proc.pid
        assert e["served_model_name"] == "hand/started"
        code, out, err = cli("stop", str(port))
        assert code == 2
        assert "not started by sage-llm" in err
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait()


def test_api_key_never_in_argv_record_or_json(cli, fake_vllm, monkeypatch, home, stop_all):
    monkeypatch.setenv("MY_ENGINE_KEY", "sk-very-secret-42")
    code, out, err = cli("start", "org/keyed", "--port", str(free_port()), "--api-key-env", "MY_ENGINE_KEY")
    assert code == 0, err
    doc_text = cli("status", "--json")[1]
    assert json.loads(doc_text)["engines"][0]["state"] == "ready"  # probed with the key
    rec_text = (home / "engines" / "keyed.json").read_text()
    log_text = (home / "logs" / "keyed.log").read_text()
    pid = json.loads(rec_text)["pid"]
    cmdline = " ".join(psutil.Process(pid).cmdline())
    for text in (doc_text, rec_text, log_text, cmdline, out, err):
        assert "sk-very-secret-42" not in text
    assert psutil.Process(pid).environ()["VLLM_API_KEY"] == "sk-very-secret-42"


def test_console_script_errors_are_one_line(tmp_path):
    exe = Path(sys.executable).parent / "sage-llm"
    env = dict(os.environ, SAGE_LLM_HOME=str(tmp_path / "h"))
    r = subprocess.run([str(exe), "start", "--port", "abc", "org/x"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "h" / "engines").exists() or not list((tmp_path / "h" / "engines").iterdir())
