"""Engines that fit the machine by default (issue 24 item 4): with no --max-model-len, a vLLM that takes it is started
with `--max-model-len auto`, and the length it chose is reported (start's output, the record, `status --json`); the
user's length is kept. The fake vLLM fits like vLLM 0.32: its KV cache holds FAKE_VLLM_KV_TOKENS tokens. The same
with the real CPU vLLM: tests/integration/test_max_model_len_real.py."""

from __future__ import annotations

import json

import pytest

from sage_llm.core.state import StateStore
from sage_llm.engine.vllm import fitted_len, supports_auto_len


def _engine(cli, name: str) -> dict:
    code, out, err = cli("status", name, "--json")
    assert code == 0, err
    return next(e for e in json.loads(out)["engines"] if e["name"] == name)


@pytest.fixture
def long_model(fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model configured for 131,072 tokens on an engine whose KV cache holds 4,096."""
    monkeypatch.setenv("FAKE_VLLM_MAX_MODEL_LEN", "131072")
    monkeypatch.setenv("FAKE_VLLM_KV_TOKENS", "4096")


@pytest.mark.usefixtures("stop_all", "long_model")
def test_a_context_too_long_for_the_kv_cache_is_fitted_and_reported(cli) -> None:
    code, out, err = cli("start", "org/long", "--name", "long", "--json")
    assert code == 0, err
    assert json.loads(out)["max_model_len"] == 4096
    rec = StateStore().load("long")
    i = rec.argv.index("--max-model-len")
    assert rec.argv[i + 1] == "auto"
    assert rec.settings["max_model_len"] is None  # a restart fits again, on whatever memory there is then
    assert rec.max_model_len == 4096
    assert rec.ready_at
    assert _engine(cli, "long")["max_model_len"] == 4096
    cli("stop", "long")
    code, _out, err = cli("start", "org/long", "--name", "long")
    assert code == 0, err
    assert ("context: 4096 tokens (fitted to the KV cache memory: the model's 131072 does not fit; --max-model-len "
            "to choose)") in err


@pytest.mark.usefixtures("stop_all", "long_model")
def test_the_full_length_asked_for_fails_with_the_diagnosis(cli) -> None:
    """The behaviour before the default: the model's full length, which the KV cache cannot hold."""
    code, _out, err = cli("start", "org/long", "--name", "long", "--max-model-len", "131072")
    assert code == 1
    assert ("the KV cache cannot hold one request of --max-model-len 131072: vLLM estimates the maximum length that "
            "fits as 4096") in err
    assert "--max-model-len 4096" in err  # the hint


@pytest.mark.usefixtures("stop_all", "long_model")
def test_the_users_length_is_kept(cli) -> None:
    code, _out, err = cli("start", "org/long", "--name", "long", "--max-model-len", "2k")
    assert code == 0, err
    rec = StateStore().load("long")
    assert rec.argv[rec.argv.index("--max-model-len") + 1] == "2k"
    assert "auto" not in rec.argv
    assert rec.max_model_len == 2000
    assert "context: 2000 tokens (--max-model-len 2k)" in err
    assert _engine(cli, "long")["max_model_len"] == 2000


@pytest.mark.usefixtures("stop_all")
def test_a_context_that_fits_is_the_models_full_length(cli, fake_vllm) -> None:
    code, _out, err = cli("start", "org/short", "--name", "short")
    assert code == 0, err
    assert "context: 2048 tokens (the model's full length fits)" in err
    assert StateStore().load("short").max_model_len == 2048


def test_which_engines_take_auto() -> None:
    assert supports_auto_len("0.32.0+cpu")
    assert supports_auto_len("0.13.0")
    assert not supports_auto_len("0.12.1")
    assert not supports_auto_len(None)
    assert not supports_auto_len("unknown")
    line = ("(EngineCore pid=1) INFO 12-06 18:00:00 [kv_cache_utils.py:2478] Auto-fit max_model_len: reduced from "
            "131072 to 13920 to fit in available KV cache memory (0.50 GiB CPU)")
    assert fitted_len(["x", line, "y"]) == (131072, 13920)
    assert fitted_len(["Auto-fit max_model_len: full model context length 2048 fits in available KV cache"]) is None


@pytest.mark.usefixtures("stop_all", "long_model")
def test_a_length_passed_through_to_vllm_is_kept(cli) -> None:
    code, _out, err = cli("start", "org/long", "--name", "long", "--", "--max-model-len", "1024")
    assert code == 0, err
    rec = StateStore().load("long")
    assert "auto" not in rec.argv
    assert rec.max_model_len == 1024
    assert "context: 1024 tokens (--max-model-len 1024)" in err
