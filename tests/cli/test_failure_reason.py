"""A failed start names the cause and the next command; the reason is kept in the record for `status` (fake vLLM)."""

from __future__ import annotations

import json

import pytest

from tests.support.discipline import wait_for


def managed(out: str) -> list[dict]:
    """This test's engines (other developers' and tests' vLLM servers may show up as external ones)."""
    return [e for e in json.loads(out)["engines"] if e["managed"]]


@pytest.mark.usefixtures("stop_all")
def test_failed_start_is_diagnosed_and_recorded(cli, fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "load")
    monkeypatch.setenv("FAKE_VLLM_FAIL_TEXT", "ValueError: To serve at least one request with the model's max seq len "
                       "(32768), (4.00 GiB KV cache is needed, which is larger than the available KV cache memory "
                       "(1.00 GiB). Based on the available memory, the estimated maximum model length is 8190.")
    code, _out, err = cli("start", "org/tiny", "--name", "tiny")
    assert code == 1
    assert "estimates the maximum length that fits as 8190" in err
    assert "--max-model-len 7168" in err  # the hint: vLLM's estimate rounded down to a multiple of 1024
    code, out, _ = cli("status", "--json")
    eng = managed(out)[0]
    assert eng["state"] == "failed"
    assert "engine 'tiny' exited during startup" in eng["error"]
    assert "8190" in eng["error"]
    assert "hint: start again with --max-model-len 7168" in eng["error"]
    code, _out, err = cli("status")
    assert "tiny: engine 'tiny' exited during startup" in err


@pytest.mark.usefixtures("stop_all")
def test_engine_crash_after_ready_is_explained_by_status(cli, fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "ready:0.5")
    assert cli("start", "org/tiny", "--name", "tiny")[0] == 0
    eng = wait_for(lambda: (e := managed(cli("status", "--json")[1])[0])["state"] == "failed" and e, 30, interval=0.2,
                   what="the engine that crashed after ready to show as failed")
    assert "fake engine crash after ready" in eng["error"]


@pytest.mark.usefixtures("stop_all")
def test_clean_stop_leaves_no_error(cli, fake_vllm) -> None:
    assert cli("start", "org/tiny", "--name", "tiny")[0] == 0
    assert cli("stop", "tiny")[0] == 0
    assert managed(cli("status", "--json")[1]) == []
