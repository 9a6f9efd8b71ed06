"""`sage llm config show | path | set | unset` through the real CLI entry (error mapping included)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest


@pytest.fixture
def config_file() -> Path:
    return Path(os.environ["SAGE_LLM_CONFIG"])


def test_path_prints_the_config_file(cli, config_file: Path) -> None:
    code, stdout, _ = cli("config", "path")
    assert code == 0
    assert stdout.strip() == str(config_file)


def test_set_then_show_reports_value_and_source(cli, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGE_LOCAL_ENGINE_PORT")
    code, stdout, _ = cli("config", "set", "local_engine_port", "19511")
    assert code == 0
    assert "local_engine_port = 19511" in stdout
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600

    monkeypatch.setenv("SAGE_LOCAL_ENGINE_GPU_UTIL", "0.55")
    code, stdout, _ = cli("config", "show", "--json")
    assert code == 0
    doc = json.loads(stdout)
    port = doc["settings"]["local_engine_port"]
    assert (port["value"], port["source"], port["origin"]) == (19511, "config", str(config_file))
    util = doc["settings"]["gpu_util"]
    assert (util["value"], util["source"], util["origin"]) == (0.55, "env", "SAGE_LOCAL_ENGINE_GPU_UTIL")
    assert doc["settings"]["default_model"]["source"] == "default"
    assert doc["config_file"] == str(config_file)

    code, stdout, stderr = cli("config", "show")
    assert code == 0
    line = next(x for x in stdout.splitlines() if x.startswith("local_engine_port"))
    assert "19511" in line
    assert "config file" in line


def test_secrets_show_only_as_set_or_unset(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    code, stdout, _ = cli("config", "show", "--json")
    assert json.loads(stdout)["settings"]["chat_api_key"]["is_set"] is False
    monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-very-secret-value")
    code, stdout, stderr = cli("config", "show", "--json")
    key = json.loads(stdout)["settings"]["chat_api_key"]
    assert key["is_set"] is True
    assert key["value"] is None
    assert "sk-very-secret-value" not in stdout + stderr
    code, stdout, stderr = cli("config", "show")
    assert "sk-very-secret-value" not in stdout + stderr
    assert next(x for x in stdout.splitlines() if x.startswith("chat_api_key")).split()[1] == "set"
    code, stdout, stderr = cli("config", "set", "chat_api_key", "sk-other-secret")
    assert code == 0
    assert "sk-other-secret" not in stdout + stderr


def test_set_refuses_bad_values_with_exit_2_and_writes_nothing(cli, config_file: Path) -> None:
    code, stdout, stderr = cli("config", "set", "gpu_util", "1.7")
    assert code == 2
    assert stdout == ""
    assert "gpu_util" in stderr
    assert "(0, 1]" in stderr
    assert not config_file.exists()
    code, _, stderr = cli("config", "set", "no_such_key", "1")
    assert code == 2
    assert "unknown setting" in stderr


def test_show_flags_an_invalid_value_and_exits_2(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_LOCAL_ENGINE_PORT", "not-a-port")
    code, stdout, stderr = cli("config", "show", "--json")
    assert code == 2
    assert "not a port" in json.loads(stdout)["settings"]["local_engine_port"]["error"]
    code, stdout, stderr = cli("config", "show")
    assert code == 2
    assert "INVALID" in stdout
    assert "SAGE_LOCAL_ENGINE_PORT" in stderr


def test_unset_goes_back_to_the_default(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("config", "set", "stop_timeout", "12.5")
    code, stdout, _ = cli("config", "show", "--json")
    assert json.loads(stdout)["settings"]["stop_timeout"]["value"] == 12.5
    code, stdout, _ = cli("config", "unset", "stop_timeout")
    assert code == 0
    assert "removed" in stdout
    code, stdout, _ = cli("config", "show", "--json")
    assert json.loads(stdout)["settings"]["stop_timeout"]["source"] == "default"


def test_set_reads_the_value_from_stdin_with_dash(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from sage_llm.core import settings

    monkeypatch.setattr("sys.stdin", io.StringIO("sk-from-stdin-123\n"))
    code, stdout, stderr = cli("config", "set", "chat_api_key", "-")
    assert code == 0, stderr
    assert "sk-from-stdin-123" not in stdout + stderr
    assert settings.read_config()["chat_api_key"] == "sk-from-stdin-123"
    assert settings.resolve("chat_api_key").source == "config"
