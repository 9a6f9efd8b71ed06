"""`sage llm logs` and `logs --audit` against engines run by the fake vLLM."""

from __future__ import annotations

import json
import threading
import time

import pytest


@pytest.mark.usefixtures("stop_all")
def test_logs_name_optional_with_one_engine_and_required_with_two(cli, fake_vllm) -> None:
    assert cli("start", "org/one", "--name", "one")[0] == 0
    code, out, _err = cli("logs", "-n", "5")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 5
    assert any("Application startup complete" in ln or "Route" in ln or "INFO" in ln for ln in lines)
    code, out, _ = cli("logs", "one", "-n", "1000")
    assert "===== sage llm start one" in out
    assert "Starting vLLM server on" in out
    assert cli("start", "org/two", "--name", "two")[0] == 0
    code, out, err = cli("logs")
    assert code == 2
    assert out == ""
    assert "2 engines are running; say which: one (port" in err
    assert "two (port" in err
    # by port
    port = json.loads(cli("status", "two", "--json")[1])["engines"][0]["port"]
    code, out, _ = cli("logs", str(port), "-n", "1000")
    assert code == 0
    assert "===== sage llm start two" in out


def test_logs_unknown_engine_and_bad_options(cli) -> None:
    code, _, err = cli("logs")
    assert code == 2
    assert "no engines are recorded" in err
    code, _, err = cli("logs", "nope")
    assert code == 2
    assert "no engine or log named 'nope'" in err
    code, _, err = cli("logs", "--since", "soon")
    assert code == 2
    assert "--since 'soon' is not a duration" in err


@pytest.mark.usefixtures("stop_all")
def test_follow_ends_when_the_engine_is_stopped(cli, fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("start", "org/one", "--name", "one")[0] == 0
    from sage_llm.engine import logtarget

    following = threading.Event()
    real_ended = logtarget.engine_ended

    def engine_ended(*args, **kwargs):
        check = real_ended(*args, **kwargs)

        def first_check_means_following():
            following.set()  # follow has read the log to its end and now asks whether the engine ended
            return check()
        return first_check_means_following

    monkeypatch.setattr(logtarget, "engine_ended", engine_ended)

    def stop_later() -> None:
        following.wait(60)  # then stop anyway, so that a follow that never started cannot hang the test
        from sage_llm.engine import manager

        manager.stop("one", timeout=5)

    t = threading.Thread(target=stop_later)
    t.start()
    t0 = time.monotonic()
    code, out, err = cli("logs", "one", "-f", "-n", "0")
    t.join()
    assert following.is_set()
    assert code == 0
    assert time.monotonic() - t0 < 10
    assert "engine 'one' was stopped; stopped following" in err
    assert "[shutdown] API server: shutdown triggered" in out  # lines written while stopping are shown


@pytest.mark.usefixtures("stop_all")
def test_logs_of_a_stopped_engine_by_name(cli, fake_vllm) -> None:
    assert cli("start", "org/one", "--name", "one")[0] == 0
    assert cli("stop", "one")[0] == 0
    code, out, _ = cli("logs", "one", "-n", "3")
    assert code == 0
    assert "Shutting down FastAPI HTTP server" in out


@pytest.mark.usefixtures("stop_all")
def test_audit_records_start_and_stop(cli, fake_vllm, monkeypatch: pytest.MonkeyPatch, home) -> None:
    monkeypatch.setenv("SECRET_FOR_ENGINE", "sk-abcdefghijklmnopq")
    # refused (a secret after `--`): bad input changes nothing, so it writes nothing, not even an audit line
    assert cli("start", "org/one", "--name", "one", "--", "--api-key", "sk-abcdefghijklmnopq")[0] == 2
    assert not (home / "audit.jsonl").exists()
    assert cli("start", "org/one", "--name", "one", "--api-key-env", "SECRET_FOR_ENGINE")[0] == 0
    assert cli("stop", "one")[0] == 0
    code, out, _ = cli("logs", "--audit", "--json")
    assert code == 0
    entries = json.loads(out)["entries"]
    assert [(e["command"], e["outcome"]) for e in entries] == [("start", "ok"), ("stop", "ok")]
    start, stop = entries[-2:]
    assert start["result"]["engine"] == "one"
    assert start["args"]["name"] == "one"
    assert start["args"]["spec"]["api_key_env"] == "SECRET_FOR_ENGINE"
    assert "sk-abcdefghijklmnopq" not in (home / "audit.jsonl").read_text()
    assert stop["args"]["name"] == "one"
    assert stop["result"]["stopped"] is True
    code, out, _ = cli("logs", "--audit", "-n", "1")
    assert code == 0
    assert len(out.splitlines()) == 1
    assert " stop  ok" in out


def test_failed_start_is_audited_as_error(cli, fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "load")
    assert cli("start", "org/one", "--name", "one")[0] == 1
    (entry,) = json.loads(cli("logs", "--audit", "--json")[1])["entries"]
    assert entry["command"] == "start"
    assert entry["outcome"] == "error"
    assert "exited during startup" in entry["error"]


@pytest.mark.usefixtures("stop_all")
def test_follow_shows_a_line_written_between_the_tail_and_the_follow(cli, fake_vllm,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`logs -f` prints the last lines, then follows: a line the engine writes after the tail was read and before the
    follow opened the file is shown (it was lost when the follow started at the file's end)."""
    assert cli("start", "org/one", "--name", "one")[0] == 0
    from sage_llm.observe import logs

    real_tail = logs.tail
    written = []

    def tail_then_the_engine_writes(path, n, end=None):
        shown = real_tail(path, n, end)
        with open(path, "a", encoding="utf-8") as fh:  # the engine writes a line right after the tail was read
            fh.write("INFO between the tail and the follow\n")
        written.append(path)
        return shown

    monkeypatch.setattr(logs, "tail", tail_then_the_engine_writes)
    # the follow ends at its first check, which comes only after it has read everything written so far
    from sage_llm.engine import logtarget

    monkeypatch.setattr(logtarget, "engine_ended", lambda *a, **k: lambda: "test done")
    code, out, err = cli("logs", "one", "-f", "-n", "2")
    assert code == 0, err
    assert written
    assert "test done; stopped following" in err
    assert out.count("INFO between the tail and the follow") == 1


def test_an_engine_gone_while_stop_removes_it_was_stopped_not_exited(home) -> None:
    """`sage-llm stop` marks the record `stopping`, signals, waits, then removes the record: between the engine's
    exit and the removal, `run` and `logs -f` must say it was stopped (run exits 0), not that it exited by itself."""
    import subprocess
    import sys

    from sage_llm.core.state import EngineRecord, StateStore, utcnow_iso
    from sage_llm.engine import logtarget, process

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    info = process.read_stat(child.pid)
    child.wait()  # a pid that was ours and is gone
    store = StateStore()
    rec = EngineRecord(name="gone", model="org/m", served_model_name="org/m", host="127.0.0.1", port=1, id="ab" * 8,
                       log_file=str(home / "gone.log"), started_at=utcnow_iso(), state="running", pid=child.pid,
                       create_time=info.create_time if info else None)
    store.save(rec)
    target = logtarget.LogTarget("gone", home / "gone.log", rec)
    assert "exited" in (logtarget.engine_ended(target, store)() or "")
    rec.state = "stopping"
    store.save(rec)
    assert logtarget.engine_ended(target, store)() == "engine 'gone' was stopped"
