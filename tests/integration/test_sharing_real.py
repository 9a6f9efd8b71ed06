"""A shared gateway (issue 22) in front of the real CPU vLLM: a user key chats (streamed and not) and may not stop the
engine; an admin key stops it; the usage the gateway recorded per key equals vLLM's own token counters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tests.integration.test_gateway_real import _profiles, real_gateway  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _counter(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.MULTILINE))


def test_two_keys_with_different_roles_drive_a_real_engine(real_gateway, tiny_model: str, tmp_path: Path,  # noqa: F811
                                                           home: Path) -> None:
    from sage_llm.gateway import keys, usage

    _profiles(tmp_path, tiny_model)
    _, user = keys.add("alice", "user", [tiny_model])
    _, admin = keys.add("bob", "admin")
    gw, url = real_gateway()
    alice = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {user}"}, timeout=600)
    bob = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=600)
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401

    body = {"model": tiny_model, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello"}]}
    r = alice.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    first_usage = r.json()["usage"]
    with alice.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        assert s.status_code == 200
        text = s.read().decode()
    frames = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: ") and line[6:].strip() != "[DONE]"]
    assert frames
    assert all(not f.get("usage") for f in frames)  # the usage chunk the gateway asked for is not shown
    with alice.stream("POST", "/v1/chat/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        asked = [json.loads(line[6:]) for line in s.read().decode().splitlines()
                 if line.startswith("data: {")]
    assert asked[-1]["usage"]["completion_tokens"] >= 1  # shown when the client asked for it

    refused = alice.post("/api/local-engine/stop", json={"model": tiny_model})
    assert refused.status_code == 403
    assert "admin" in refused.json()["error"]["message"]
    engine = gw.router.engines[0]
    metrics = httpx.get(f"{engine.base_url}/metrics", timeout=30).text
    rows = {r.key: r for r in usage.summarize(by="key")}
    assert rows["alice"].requests == 3
    assert rows["alice"].errors == 0
    assert rows["alice"].prompt_tokens == _counter(metrics, "vllm:prompt_tokens_total")
    assert rows["alice"].completion_tokens == _counter(metrics, "vllm:generation_tokens_total")
    assert rows["alice"].prompt_tokens >= 3 * first_usage["prompt_tokens"] > 0

    stopped = bob.post("/api/local-engine/stop", json={"model": tiny_model})
    assert stopped.status_code == 200, stopped.text
    audit = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
    assert [e["key"] for e in audit if e["command"] == "stop"] == ["bob"]
    from sage_llm.core.state import StateStore

    assert StateStore().names() == []  # the engine is gone (its record removed once its processes exited)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{engine.base_url}/health", timeout=5)
