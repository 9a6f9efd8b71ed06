"""restart/switch go through sage_llm.api like start: the same timeout settings, and every pre-flight of `start`
runs before the old engine is touched (fake vLLM)."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from sage_llm.core.state import EngineRecord, StateStore
from sage_llm.engine import manager
from tests.conftest import free_port

pytestmark = pytest.mark.usefixtures("fake_vllm", "stop_all")


def _start(cli, model: str = "org/model-a") -> EngineRecord:
    code, _out, err = cli("start", model, "--name", "eng", "--port", str(free_port()))
    assert code == 0, err
    rec = StateStore().load("eng")
    assert isinstance(rec, EngineRecord)
    return rec


def _alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.parametrize("command", ["restart", "switch"])
def test_restart_and_switch_take_the_timeouts_from_the_settings(cli, monkeypatch, command):
    """Old code hard-coded timeout=900 and the stop timeout: SAGE_LLM_STARTUP_TIMEOUT/STOP_TIMEOUT were ignored."""
    _start(cli)
    seen: dict[str, float] = {}
    real_start, real_stop = manager.start, manager.stop

    def spy_start(*args, **kwargs):
        seen["start"] = kwargs["timeout"]
        return real_start(*args, **kwargs)

    def spy_stop(*args, **kwargs):
        seen["stop"] = kwargs["timeout"]
        return real_stop(*args, **kwargs)

    monkeypatch.setattr(manager, "start", spy_start)
    monkeypatch.setattr(manager, "stop", spy_stop)
    monkeypatch.setenv("SAGE_LLM_STARTUP_TIMEOUT", "77")
    monkeypatch.setenv("SAGE_LLM_STOP_TIMEOUT", "12")
    args = ["restart", "eng"] if command == "restart" else ["switch", "eng", "org/model-b"]
    code, _out, err = cli(*args)
    assert code == 0, err
    assert seen == {"start": 77.0, "stop": 12.0}


def test_restart_timeout_from_the_config_file_really_applies(cli, monkeypatch, tmp_path):
    """A startup timeout from the config file ends a restart whose engine does not get ready in time."""
    _start(cli)
    config = tmp_path / "config" / "llm.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("start_timeout = 2\n")
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "60")
    t0 = time.monotonic()
    code, _out, err = cli("restart", "eng")
    took = time.monotonic() - t0
    assert code == 1, err
    assert "not ready after 2 s" in err
    assert took < 30, took  # the fake would load for 60 s; the old code waited up to 900 s


def test_switch_offline_to_an_uncached_model_is_refused_before_the_old_engine_stops(cli, monkeypatch):
    """Old code stopped the old engine first, then the start failed on the offline check: nothing served."""
    rec = _start(cli)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for rolling in ([], ["--rolling"]):
        code, _out, err = cli("switch", "eng", "org/not-cached", *rolling)
        assert code == 2, err
        assert "HF_HUB_OFFLINE" in err
        assert "nothing was started" in err
        after = StateStore().load("eng")
        assert isinstance(after, EngineRecord)
        assert after.pid == rec.pid
        assert _alive(rec.pid)
    code, out, _err = cli("status", "eng", "--json")
    assert code == 0
    assert json.loads(out)["engines"][0]["state"] == "ready"


def test_restart_offline_to_an_uncached_model_keeps_the_engine(cli, monkeypatch):
    rec = _start(cli)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _out, err = cli("restart", "eng", "--model", "org/not-cached")
    assert code == 2, err
    assert _alive(rec.pid)


@pytest.mark.parametrize("args", [["start", ""], ["start", "  "], ["run", ""], ["switch", "eng", ""],
                                  ["restart", "eng", "--model", ""]])
def test_an_empty_model_is_bad_input(cli, args):
    code, _out, err = cli(*args)
    assert code == 2, err
    assert "empty" in err
    assert len(err.strip().splitlines()) == 1
    assert StateStore().names() == []


def test_status_exit_3_rule_is_the_same_on_the_fast_path_and_the_full_cli(cli, monkeypatch, capsys):
    """`status NAME --json` (fast path, no Typer) and the Typer command decide exit 3 by one rule: api.not_ready."""
    from sage_llm.cli import _output
    from sage_llm.cli.main import _run_typer

    def typer_json(target: str) -> int:
        _output.reset()
        code = _run_typer(["status", target, "--json"], "sage-llm")
        capsys.readouterr()
        return code

    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "0.3")
    code, _o, err = cli("start", "org/ready", "--name", "ready", "--port", str(free_port()))
    assert code == 0, err
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "60")
    code, _o, err = cli("start", "org/slow", "--name", "loading", "--port", str(free_port()), "--no-wait")
    assert code == 0, err
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "0.3")
    monkeypatch.setenv("FAKE_VLLM_FAIL", "load")
    code, _o, err = cli("start", "org/broken", "--name", "broken", "--port", str(free_port()))
    assert code == 1, err
    expected = {"ready": 0, "loading": 3, "broken": 3, "nobody": 3, "1": 3}
    for target, want in expected.items():
        fast = cli("status", target, "--json")[0]
        table = cli("status", target)[0]
        assert (fast, typer_json(target), table) == (want, want, want), target


def test_version_fast_path_prints_what_typer_prints(cli, capsys):
    from sage_llm.cli.main import _run_typer

    code, out, _err = cli("--version")
    assert code == 0
    assert out.startswith("sage-llm ")
    typer_code = _run_typer(["--version"], "sage-llm")
    assert (typer_code, capsys.readouterr().out) == (0, out)


def test_a_dotenv_file_cannot_expose_an_engine_to_the_network(cli, monkeypatch, tmp_path):
    """A cloned repository's ./.env setting SAGE_LOCAL_ENGINE_HOST=0.0.0.0 used to bind the engine to every interface
    (with a warning only): a non-loopback bind needs the user's own word."""
    dotenv = tmp_path / "repo.env"
    dotenv.write_text("SAGE_LOCAL_ENGINE_HOST=0.0.0.0\n")
    monkeypatch.setenv("SAGE_LLM_DOTENV", str(dotenv))
    code, out, err = cli("start", "org/x", "--port", str(free_port()))
    assert (code, out) == (2, ""), err
    assert "SAGE_LOCAL_ENGINE_HOST=0.0.0.0 comes only from" in err
    assert len(err.strip().splitlines()) == 1
    assert StateStore().names() == []
    dotenv.write_text("SAGE_LOCAL_ENGINE_HOST=127.0.0.1\n")  # loopback from .env is harmless
    code, _out, err = cli("start", "org/x", "--name", "lo", "--port", str(free_port()))
    assert code == 0, err
