"""`status` shows the load stage of a starting engine; `--json` carries `stage` and `progress` (fake vLLM)."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.discipline import wait_for


@pytest.mark.usefixtures("stop_all")
def test_status_json_reports_stage_while_loading(cli, fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "4")  # four shard lines, one per second
    code, out, err = cli("start", "org/tiny", "--name", "tiny", "--no-wait")
    assert code == 0, err
    seen: list[tuple[str, float | None]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        code, out, _ = cli("status", "tiny", "--json")
        eng = next(e for e in json.loads(out)["engines"] if e["name"] == "tiny")
        seen.append((eng["stage"], eng["progress"]))
        if eng["state"] == "ready":
            break
        assert eng["state"] == "starting"
        assert eng["stage"] in ("launching", "resolving", "loading_weights", "kv_cache", "starting_server")
        assert eng["progress"] is None or 0 <= eng["progress"] <= 1
        time.sleep(0.2)
    assert seen[-1] == ("ready", 1.0)
    loading = [p for s, p in seen if s == "loading_weights"]
    assert loading, seen
    assert any(p is not None and 0 < p < 1 for p in loading), seen


@pytest.mark.usefixtures("stop_all")
def test_human_status_names_the_stage(cli, fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "6")
    assert cli("start", "org/tiny", "--name", "tiny", "--no-wait")[0] == 0
    out = wait_for(lambda: "loading weights" in (text := cli("status")[1]) and text, 30, interval=0.2,
                   what="`status` to say the engine is loading weights")
    assert "starting: loading weights" in out
