"""The panel's engine card shows the context the engine serves (`max_model_len` in /api/engines): vLLM's fitted length
when it was started with `--max-model-len auto` (issue 24 item 4). Fake engines; the card: test_web_panel.py."""

from __future__ import annotations

import time

import pytest

from tests.gateway.conftest import MODEL_A

pytestmark = pytest.mark.timeout(120)


def test_engines_carry_the_fitted_context(gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_MAX_MODEL_LEN", "131072")  # the model's context, more than the KV cache holds
    monkeypatch.setenv("FAKE_VLLM_KV_TOKENS", "8192")
    gw = gateway()
    r = gw.post("/api/local-engine/start?wait=1", {"model": MODEL_A})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the gateway's refresh loop takes the engine's view after the start
        e = next(x for x in gw.client.get("/api/engines").json()["engines"] if x["model"] == MODEL_A)
        if e["max_model_len"] is not None:
            break
        time.sleep(0.1)
    assert e["max_model_len"] == 8192
