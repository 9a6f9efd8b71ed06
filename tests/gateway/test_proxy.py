"""Priority 1-2: routing, streaming passthrough, OpenAI-format errors, on-demand loads against the fake engine."""

from __future__ import annotations

import concurrent.futures as cf

import httpx

from sage_llm.core.state import EngineRecord, StateStore
from tests.gateway.conftest import MODEL_A, MODEL_B, engine_starts, sse_events


def test_models_list_cached_models_as_loadable(gateway) -> None:
    gw = gateway()
    assert gw.client.get("/health").json()["status"] == "ok"
    data = {c["id"]: c for c in gw.client.get("/v1/models").json()["data"]}
    assert data[MODEL_A]["state"] == "available"
    assert data[MODEL_A]["loadable"] is True
    assert data[MODEL_B]["engine"] is None


def test_on_demand_load_then_proxy_stream_and_plain(gateway, home) -> None:
    gw = gateway()
    r = gw.chat(MODEL_A)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello from the fake vLLM."
    assert r.headers["x-sage-llm-source"] == "local"
    engine = r.headers["x-sage-llm-engine"]
    rec = StateStore().load(engine)
    assert isinstance(rec, EngineRecord)
    assert rec.host == "127.0.0.1"
    assert rec.api_key_env
    assert rec.api_key_env.startswith("SAGE_LLM_GW_KEY_")
    assert not any("KEY" in a.upper() and "=" in a for a in rec.argv)  # the key never reaches argv
    # streamed: chunk by chunk, SSE passed through as the engine sent it
    with gw.client.stream("POST", "/v1/chat/completions", json={"model": MODEL_A, "stream": True, "messages": [
            {"role": "user", "content": "hi"}]}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        body = "".join(s.iter_text())
    assert body.rstrip().endswith("data: [DONE]")
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(body) if e.get("choices"))
    assert text == "Hello from the fake vLLM."
    # other /v1 routes go by the body's model too
    e = gw.post("/v1/embeddings", {"model": MODEL_A, "input": "x"})
    assert e.status_code == 200
    assert e.json()["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    c = gw.post("/v1/completions", {"model": MODEL_A, "prompt": "x"})
    assert c.status_code == 200
    card = {c["id"]: c for c in gw.client.get("/v1/models").json()["data"]}[MODEL_A]
    assert card["state"] == "ready"
    assert card["engine"] == engine
    assert card["managed_by_gateway"]
    assert engine_starts(home) == 1


def test_engine_refuses_requests_without_the_gateway_key(gateway) -> None:
    gw = gateway()
    engine = gw.chat(MODEL_A).headers["x-sage-llm-engine"]
    rec = StateStore().load(engine)
    # what a web page could send straight to the engine: a simple cross-site POST, no key
    r = httpx.post(f"http://127.0.0.1:{rec.port}/v1/chat/completions", content=b'{"model":"x","messages":[]}',
                   headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code == 401


def test_concurrent_requests_share_one_load(gateway, home) -> None:
    gw = gateway()
    with cf.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: gw.chat(MODEL_A).status_code, range(6)))
    assert codes == [200] * 6
    assert engine_starts(home) == 1


def test_openai_format_errors(gateway) -> None:
    gw = gateway(fallback=False, max_body=2048)
    bad = gw.client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"
    unknown = gw.chat("nobody/NoSuchModel")
    assert unknown.status_code == 404
    msg = unknown.json()["error"]["message"]
    assert "nobody/NoSuchModel" in msg
    assert MODEL_A in msg
    assert MODEL_B in msg
    big = gw.post("/v1/chat/completions", {"model": MODEL_A, "messages": [{"role": "user", "content": "x" * 5000}]})
    assert big.status_code == 413
    assert "error" in big.json()
    assert gw.client.post("/sleep", content=b"{}", headers={"Content-Type": "application/json"}).status_code == 404


def test_failed_load_gives_every_waiter_the_diagnosis_and_is_not_retried_in_a_loop(gateway, home, monkeypatch
                                                                                     ) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "load")
    monkeypatch.setenv("FAKE_VLLM_FAIL_TEXT", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    gw = gateway(fallback=False)
    with cf.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: gw.chat(MODEL_A), range(3)))
    assert {a.status_code for a in answers} == {503}
    messages = {a.json()["error"]["message"] for a in answers}
    assert len(messages) == 1  # the same words for every waiter
    # the words `sage llm start` prints for this failure (diagnose.py), with its hint
    message = messages.pop()
    assert f"CUDA out of memory while loading {MODEL_A}" in message
    assert "hint: stop other engines on that GPU" in message
    assert engine_starts(home) == 1
    again = gw.chat(MODEL_A)
    assert again.status_code == 503
    assert "Retry-After" in again.headers
    assert engine_starts(home) == 1  # held, not restarted


def test_queue_is_bounded(gateway, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "1.5")
    gw = gateway(max_queue=1)
    with cf.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: gw.chat(MODEL_A), range(3)))
    codes = sorted(a.status_code for a in answers)
    assert codes[0] == 200
    assert 503 in codes
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.json()["error"]["code"] == "queue_full"
    assert int(busy.headers["Retry-After"]) >= 1


def test_a_get_never_loads_a_model(gateway, home) -> None:
    gw = gateway()
    r = gw.client.get("/v1/models/" + MODEL_A)
    assert r.status_code == 200
    r = gw.client.get("/v1/anything", params={"model": MODEL_A})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "model_not_loaded"
    assert gw.client.get("/v1/anything").status_code == 400
    assert engine_starts(home) == 0
