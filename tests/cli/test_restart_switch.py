"""`restart` and `switch` against the fake vLLM: settings kept, rolling hand-over, failure keeps the old engine,
and a hand-over interrupted at any step leaves every engine manageable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from sage_llm.core.state import EngineRecord, StateStore
from sage_llm.engine import inspect as engine_inspect
from sage_llm.engine import switch
from tests.support.discipline import wait_for
from tests.support.ports import free_port

pytestmark = pytest.mark.usefixtures("fake_vllm", "stop_all")


def status_doc(cli) -> dict:
    code, out, _err = cli("status", "--json")
    assert code == 0
    return json.loads(out)


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_engine(cli, *args: str) -> tuple[int, EngineRecord]:
    port = free_port(span=2)  # a rolling switch starts the new engine on the next port
    code, _out, err = cli("start", "org/model-a", "--name", "eng", "--port", str(port), *args)
    assert code == 0, err
    rec = StateStore().load("eng")
    assert isinstance(rec, EngineRecord)
    return port, rec


def test_restart_keeps_every_setting_and_applies_overrides(cli):
    port, before = start_engine(cli, "--max-model-len", "1024", "--served-model-name", "chat", "--dtype", "float16",
                                "--enforce-eager", "-u", "0.5", "--", "--seed", "7")
    code, out, err = cli("restart", "eng", "--max-model-len", "2048", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["port"] == port
    assert doc["changed"] == {"max_model_len": {"before": "1024", "after": "2048"}}
    after = StateStore().load("eng")
    assert isinstance(after, EngineRecord)
    assert after.pid != before.pid
    assert not alive(before.pid)
    assert alive(after.pid)
    for key in ("model", "served_model_name", "dtype", "enforce_eager", "gpu_memory_utilization", "extra_args",
                "host", "port"):
        assert after.settings[key] == before.settings[key], key
    assert after.settings["max_model_len"] == "2048"
    argv = after.argv
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert argv[argv.index("--served-model-name") + 1] == "chat"
    assert argv[-2:] == ["--seed", "7"]
    assert "--enforce-eager" in argv
    # the flags can be turned off again
    code, _out, err = cli("restart", "eng", "--no-enforce-eager")
    assert code == 0, err
    rec = StateStore().load("eng")
    assert isinstance(rec, EngineRecord)
    assert "--enforce-eager" not in rec.argv
    assert rec.settings["max_model_len"] == "2048"


def test_restart_refuses_bad_options_before_touching_the_engine(cli):
    _port, before = start_engine(cli)
    code, _out, err = cli("restart", "eng", "--dtype", "float8")
    assert code == 2
    assert "unknown --dtype" in err
    rec = StateStore().load("eng")
    assert isinstance(rec, EngineRecord)
    assert rec.pid == before.pid
    assert alive(before.pid)
    code, _out, err = cli("restart", "nope")
    assert code == 2
    assert "no engine named 'nope'" in err


def test_switch_in_place_keeps_port_and_settings(cli):
    port, before = start_engine(cli, "--max-model-len", "512")
    code, out, err = cli("switch", "eng", "org/model-b", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == "org/model-b"
    assert doc["port"] == port
    assert doc["rolling"] is False
    rec = StateStore().load("eng")
    assert isinstance(rec, EngineRecord)
    assert rec.settings["max_model_len"] == "512"
    assert not alive(before.pid)
    engines = {e["name"]: e for e in status_doc(cli)["engines"] if e["managed"]}
    assert engines["eng"]["state"] == "ready"
    assert engines["eng"]["model"] == "org/model-b"


def test_rolling_switch_hands_the_name_to_the_new_engine(cli):
    port, before = start_engine(cli, "--max-model-len", "512")
    code, out, err = cli("switch", "eng", "org/model-b", "--rolling", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["rolling"] is True
    assert doc["port"] != port
    assert doc["previous"] == {"model": "org/model-a", "port": port, "pid": before.pid, "stopped": True}
    assert not alive(before.pid)
    status = status_doc(cli)
    managed = [e for e in status["engines"] if e["managed"]]
    assert [e["name"] for e in managed] == ["eng"]  # no temporary or retiring record is left
    assert managed[0]["port"] == doc["port"]
    assert managed[0]["model"] == "org/model-b"
    assert managed[0]["state"] == "ready"
    rec = StateStore().load("eng")
    assert isinstance(rec, EngineRecord)
    assert rec.settings["max_model_len"] == "512"
    assert rec.log_file.endswith("/eng.log")
    assert os.path.exists(rec.log_file)
    assert "org/model-b" in open(rec.log_file).read()


def test_failed_rolling_switch_keeps_the_old_engine_serving(cli, monkeypatch):
    port, before = start_engine(cli)
    monkeypatch.setenv("FAKE_VLLM_FAIL", "load")
    monkeypatch.setenv("FAKE_VLLM_FAIL_TEXT", "RuntimeError: CUDA out of memory while loading the new model")
    code, _out, err = cli("switch", "eng", "org/model-b", "--rolling")
    assert code == 1
    assert "switch to org/model-b failed, 'eng' keeps serving org/model-a on port" in err
    assert "CUDA out of memory" in err
    assert alive(before.pid)
    status = status_doc(cli)
    managed = [e for e in status["engines"] if e["managed"]]
    assert [(e["name"], e["port"], e["state"], e["pid"]) for e in managed] == [("eng", port, "ready", before.pid)]


def _spawn_pair(cli, monkeypatch) -> tuple[EngineRecord, EngineRecord]:
    _port, old = start_engine(cli)
    code, _out, err = cli("start", "org/model-b", "--name", "eng.next-ab12", "--port", str(free_port()))
    assert code == 0, err
    new = StateStore().load("eng.next-ab12")
    assert isinstance(new, EngineRecord)
    return old, new


@pytest.mark.parametrize("crash_after", [1, 2])
def test_hand_over_interrupted_at_any_step_leaves_both_engines_manageable(cli, monkeypatch, crash_after):
    old, new = _spawn_pair(cli, monkeypatch)
    store = StateStore()

    def boom(step: int) -> None:
        if step == crash_after:
            raise KeyboardInterrupt("killed mid hand-over")

    with pytest.raises(KeyboardInterrupt):
        switch.hand_over("eng", "eng.next-ab12", old, store, _step=boom)
    recorded = {r.pid for r in (store.load(n) for n in store.names()) if isinstance(r, EngineRecord)}
    assert {old.pid, new.pid} <= recorded  # every live engine still has a record
    status = status_doc(cli)
    ready_pids = {e["pid"] for e in status["engines"] if e["managed"] and e["state"] == "ready"}
    assert ready_pids == {old.pid, new.pid}
    code, _out, err = cli("stop", "--all")
    assert code == 0, err
    assert not alive(old.pid)
    assert not alive(new.pid)
    assert store.names() == []


def test_hand_over_refuses_when_the_name_changed_meanwhile(cli, monkeypatch):
    old, new = _spawn_pair(cli, monkeypatch)
    store = StateStore()
    stale = EngineRecord(**{**old.to_json(), "id": "someone-else"})
    with pytest.raises(Exception, match="changed while switching"):
        switch.hand_over("eng", "eng.next-ab12", stale, store)
    assert {n for n in store.names()} == {"eng", "eng.next-ab12"}


def test_cli_killed_mid_rolling_switch_leaves_both_engines_manageable(cli, monkeypatch, tmp_path):
    _port, old = start_engine(cli)
    env = dict(os.environ, FAKE_VLLM_LOAD_S="20")
    proc = subprocess.Popen([sys.executable, "-m", "sage_llm", "switch", "eng", "org/model-b", "--rolling"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = StateStore()

    def spawned() -> EngineRecord | None:  # the new engine of the rolling switch, recorded with its PID
        for n in store.names():
            rec = store.load(n)
            if n.startswith("eng.next-") and isinstance(rec, EngineRecord) and rec.pid:
                return rec
        return None
    temp = wait_for(spawned, 30, interval=0.05, what="the rolling switch to spawn the new engine")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    views, _ = engine_inspect.inspect(store, include_external=False)
    by_name = {v.name: v for v in views}
    assert by_name["eng"].state == "ready"
    assert by_name["eng"].pid == old.pid
    assert by_name[temp.name].state == "starting"
    code, _out, err = cli("stop", "--all")
    assert code == 0, err
    assert not alive(old.pid)
    assert not alive(temp.pid)
