"""Settings: flag > environment > ./.env (SAGE_* only) > config file > default, with typed validation."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from sage_llm.core import settings
from sage_llm.core.config import env_str


@pytest.fixture
def dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "project" / ".env"
    path.parent.mkdir()
    monkeypatch.delenv("SAGE_LLM_DOTENV")
    monkeypatch.chdir(path.parent)
    return path


@pytest.fixture
def config_file() -> Path:
    return Path(os.environ["SAGE_LLM_CONFIG"])


def test_defaults_when_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGE_LOCAL_ENGINE_PORT")
    r = settings.resolve("local_engine_port")
    assert (r.value, r.source, r.origin) == (8001, "default", None)
    assert settings.get("default_model") == "Qwen/Qwen2.5-7B-Instruct"
    assert settings.get("gpu_util") == 0.9
    assert settings.get("chat_api_key") is None


def test_each_layer_wins_over_the_ones_below(monkeypatch: pytest.MonkeyPatch, dotenv: Path, config_file: Path
                                            ) -> None:
    monkeypatch.delenv("SAGE_LOCAL_ENGINE_PORT")
    settings.set_value("local_engine_port", "19501")
    assert settings.resolve("local_engine_port").source == "config"
    assert settings.get("local_engine_port") == 19501

    dotenv.write_text("SAGE_LOCAL_ENGINE_PORT=19502\n")
    r = settings.resolve("local_engine_port")
    assert (r.value, r.source, r.origin) == (19502, "dotenv", str(dotenv))

    monkeypatch.setenv("SAGE_LOCAL_ENGINE_PORT", "19503")
    r = settings.resolve("local_engine_port")
    assert (r.value, r.source, r.origin) == (19503, "env", "SAGE_LOCAL_ENGINE_PORT")

    assert settings.resolve("local_engine_port", flag=19504).source == "flag"
    assert settings.get("local_engine_port", 19504) == 19504


def test_dotenv_never_overrides_the_environment_and_keeps_only_sage_keys(
        monkeypatch: pytest.MonkeyPatch, dotenv: Path) -> None:
    dotenv.write_text(
        "# comment\n"
        "export SAGE_LOCAL_ENGINE_DEFAULT_MODEL='Qwen/Qwen2.5-1.5B-Instruct'\n"
        "SAGE_LOCAL_ENGINE_GPU_UTIL=0.5   # trailing comment\n"
        'SAGE_CHAT_BASE_URL="http://127.0.0.1:19505/v1"\n'
        "HF_TOKEN=hf_should_not_be_read\n"
        "not a line\n"
    )
    monkeypatch.setenv("SAGE_LOCAL_ENGINE_GPU_UTIL", "0.7")
    assert settings.get("default_model") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert settings.get("gpu_util") == 0.7  # the real environment wins
    assert settings.get("chat_base_url") == "http://127.0.0.1:19505/v1"
    _, values = settings.read_dotenv()
    assert "HF_TOKEN" not in values
    assert "HF_TOKEN" not in os.environ or os.environ["HF_TOKEN"] != "hf_should_not_be_read"


def test_env_str_readers_see_dotenv_and_config(monkeypatch: pytest.MonkeyPatch, dotenv: Path) -> None:
    """Code that reads SAGE_* variables through config.env_str (chat, start) honours .env and the config file."""
    monkeypatch.delenv("SAGE_LOCAL_ENGINE_PORT")
    assert env_str("SAGE_LOCAL_ENGINE_PORT") is None
    settings.set_value("local_engine_port", "19506")
    assert env_str("SAGE_LOCAL_ENGINE_PORT") == "19506"
    dotenv.write_text("SAGE_CHAT_MODEL=gpt-x\nSAGE_LOCAL_ENGINE_PORT=19507\n")
    assert env_str("SAGE_CHAT_MODEL") == "gpt-x"
    assert env_str("SAGE_LOCAL_ENGINE_PORT") == "19507"
    assert env_str("HOME_NOT_SAGE_XYZ", "d") == "d"


def test_dotenv_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, dotenv: Path) -> None:
    dotenv.write_text("SAGE_LOCAL_ENGINE_DEFAULT_MODEL=x/y\n")
    assert settings.get("default_model") == "x/y"
    monkeypatch.setenv("SAGE_LLM_DOTENV", "")
    assert settings.get("default_model") == "Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.parametrize(("key", "raw", "why"), [
    ("local_engine_port", "80x", "not a port"),
    ("local_engine_port", "70000", "not a port"),
    ("gpu_util", "1.5", "not in (0, 1]"),
    ("gpu_util", "0", "not in (0, 1]"),
    ("gpu_util", "lots", "not a number"),
    ("start_timeout", "-1", "positive"),
    ("chat_base_url", "localhost:8000", "not an http(s) URL"),
    ("default_model", "  ", "empty"),
])
def test_invalid_values_are_refused_and_nothing_is_written(key: str, raw: str, why: str, config_file: Path) -> None:
    with pytest.raises(settings.ConfigError, match=re.escape(why)) as info:
        settings.set_value(key, raw)
    assert info.value.exit_code == 2
    assert not config_file.exists()


def test_invalid_environment_value_names_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_LOCAL_ENGINE_PORT", "eighty")
    with pytest.raises(settings.ConfigError, match="environment variable SAGE_LOCAL_ENGINE_PORT"):
        settings.get("local_engine_port")


def test_set_writes_private_toml_atomically_and_keeps_other_keys(config_file: Path) -> None:
    settings.set_value("gpu_util", "0.8")
    settings.set_value("SAGE_LOCAL_ENGINE_DEFAULT_MODEL", 'odd "quoted" \\ name')  # variable names work too
    settings.set_value("local_engine_port", "19508")
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert not [p for p in config_file.parent.iterdir() if p.name != config_file.name]  # no temp file left
    data = settings.read_config()
    assert data == {"gpu_util": 0.8, "default_model": 'odd "quoted" \\ name', "local_engine_port": 19508}
    spec, present, _ = settings.unset_value("gpu_util")
    assert present
    assert "gpu_util" not in settings.read_config()
    assert settings.unset_value("gpu_util")[1] is False


def test_broken_config_file_is_a_usage_error(config_file: Path) -> None:
    config_file.parent.mkdir(parents=True)
    config_file.write_text("local_engine_port = = 3\n")
    with pytest.raises(settings.ConfigError, match="not valid TOML"):
        settings.resolve("default_model")


def test_unknown_keys_are_reported_not_used(config_file: Path) -> None:
    config_file.parent.mkdir(parents=True)
    config_file.write_text('local_engine_prot = 19509\ngpu_util = 0.6\n')
    resolved, warnings = settings.resolve_all()
    assert any("local_engine_prot" in w for w in warnings)
    assert {r.key: r.value for r in resolved}["gpu_util"] == 0.6


def test_unknown_setting_name() -> None:
    with pytest.raises(settings.UsageError, match="unknown setting 'colour'"):
        settings.set_value("colour", "blue")


def test_one_table_covers_the_documented_keys() -> None:
    keys = {s.key for s in settings.SETTINGS}
    assert {"local_engine_port", "default_model", "gpu_util", "host", "start_timeout", "stop_timeout",
            "chat_base_url", "chat_model"} <= keys
    assert len({s.env for s in settings.SETTINGS}) == len(settings.SETTINGS)
    assert [s.key for s in settings.SETTINGS if s.secret] == ["chat_api_key"]


@pytest.mark.parametrize("xdg", [None, "/tmp/xdg-config-test"])
def test_default_config_path_is_platformdirs_user_config_dir(monkeypatch: pytest.MonkeyPatch, xdg: str | None) -> None:
    """The Linux fast path (no platformdirs import on `status --json`) gives what platformdirs gives."""
    import platformdirs

    monkeypatch.delenv("SAGE_LLM_CONFIG")
    if xdg is None:
        monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CONFIG_HOME", xdg)
    assert settings.config_path() == Path(platformdirs.user_config_dir("sage")) / "llm.toml"


def test_docs_table_lists_every_setting() -> None:
    """docs/configuration.md documents each row of SETTINGS with its variable and default."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for s in settings.SETTINGS:
        default = "—" if s.default is None else f"`{s.default:g}`" if isinstance(s.default, float) else f"`{s.default}`"
        assert f"| `{s.key}` | `{s.env}` | {default} |" in doc, f"add {s.key} to the table in docs/configuration.md"
