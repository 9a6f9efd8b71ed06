"""The gateway's edges (issue 21's audit classes): what the relay copies from the upstream's headers, what a request
can put into metric labels, what an engine inherits from the gateway's environment, and JSON bodies that are valid
but pathological. Raw bytes over a socket where a client library would normalise what is sent."""

from __future__ import annotations

import gzip
import json

import psutil
import pytest

from sage_llm.core.state import StateStore
from tests.gateway.conftest import MODEL_A, engine_starts
from tests.gateway.test_security import raw_request


@pytest.fixture
def cloud(monkeypatch):
    from tests.fakes.fake_openai import FakeOpenAI

    api = FakeOpenAI(key="sk-cloud", models=("gpt-test",)).start()
    monkeypatch.setenv("SAGE_CHAT_BASE_URL", api.base_url)
    monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-cloud")
    monkeypatch.setenv("SAGE_CHAT_MODEL", "gpt-test")
    yield api
    api.stop()


CLOUD_CHAT = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}'


# ------------------------------------------------------------------------------------------------ response headers
def test_a_compressed_upstream_answer_keeps_its_content_encoding(gateway, cloud) -> None:
    """The relay passes bytes through as they came: the header saying they are gzip must come with them (a cloud
    API gzips JSON for clients that accept it; the gateway used to ask for gzip itself and drop the header)."""
    cloud.gzip = True
    gw = gateway()
    port = gw.gw.opts.port
    status, headers, body = raw_request(port, "POST", "/v1/chat/completions", CLOUD_CHAT,
                                        headers=("Accept-Encoding: gzip",))
    assert status == 200
    assert headers.get("content-encoding") == "gzip"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(gzip.decompress(body))["choices"][0]["message"]["content"] == "Hello from the cloud."
    # a client that accepts no encoding gets plain JSON
    status, headers, body = raw_request(port, "POST", "/v1/chat/completions", CLOUD_CHAT)
    assert status == 200
    assert "content-encoding" not in headers
    assert json.loads(body)["model"] == "gpt-test"
    # and the usual client (httpx: accepts gzip, decodes it) reads the answer
    assert gw.chat("gpt-test").json()["choices"][0]["message"]["content"] == "Hello from the cloud."


def test_retry_after_of_the_upstream_reaches_the_client(gateway, cloud) -> None:
    cloud.status = 429
    cloud.headers = {"Retry-After": "17"}
    gw = gateway()
    r = gw.chat("gpt-test")
    assert r.status_code == 429
    assert r.headers["retry-after"] == "17"


# ------------------------------------------------------------------------------------------------ metric labels
def test_request_values_never_become_metric_labels(gateway) -> None:
    """A client must not create a time series per model name it sends, nor write into the exposition format."""
    gw = gateway(fallback=False)
    for n in range(20):
        gw.chat(f"nobody/x{n}")
    r = gw.post("/v1/chat/completions", {"model": 'x"} 1\nsage_llm_gateway_swaps_total 99\n{a="', "messages": []})
    assert r.status_code == 400
    assert gw.chat(MODEL_A).status_code == 200
    text = gw.client.get("/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith("sage_llm_gateway_requests_total")]
    assert 'sage_llm_gateway_requests_total{model="other",source="none",code="404"} 20' in lines
    assert not [ln for ln in text.splitlines() if "nobody" in ln]
    assert "sage_llm_gateway_swaps_total 0" in text.splitlines()
    assert "sage_llm_gateway_swaps_total 99" not in text
    assert len(lines) == 2, lines


# ------------------------------------------------------------------------------------------------ engine environment
def test_engines_do_not_inherit_the_gateways_secrets_or_dev_switches(gateway, monkeypatch) -> None:
    monkeypatch.setenv("GW_CLIENT_KEY", "gateway-client-S3CR3T")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cloud-S3CR3T")
    monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-cloud-S3CR3T-2")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-S3CR3T")
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")  # would open the dev routes (unguarded by the key)
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.invalid:3128")
    monkeypatch.setenv("HF_TOKEN", "hf-needed-for-gated-downloads")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # tuning: passes
    gw = gateway(api_key_env="GW_CLIENT_KEY")
    r = gw.chat(MODEL_A, headers={"Authorization": "Bearer gateway-client-S3CR3T"})
    assert r.status_code == 200
    rec = StateStore().load(r.headers["x-sage-llm-engine"])
    env = psutil.Process(rec.pid).environ()
    for name in ("GW_CLIENT_KEY", "OPENAI_API_KEY", "SAGE_CHAT_API_KEY", "GITHUB_TOKEN", "VLLM_SERVER_DEV_MODE",
                 "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "HTTPS_PROXY"):
        assert name not in env, name
    assert not [v for v in env.values() if "S3CR3T" in v]
    assert env["HF_TOKEN"] == "hf-needed-for-gated-downloads"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "127.0.0.1" in env["NO_PROXY"].split(",")
    assert env["VLLM_API_KEY"]  # its own key, and only that one


def test_engine_env_rules() -> None:
    from sage_llm.gateway import engine_env

    env = {"MY_API_KEY": "x", "AWS_SECRET_ACCESS_KEY": "x", "DB_PASSWORD": "x", "FAKE_VLLM_TOKEN_DELAY_S": "0.1",
           "HF_TOKEN": "x", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "VLLM_ATTENTION_BACKEND": "x",
           "SAGE_LLM_GW_KEY_ABC123": "x", "SAGE_LLM_GATEWAY_API_KEY_ENV": "X", "http_proxy": "http://proxy:3128",
           "ALL_PROXY": "socks5://u:p@proxy:1080", "NO_PROXY": "corp.example", "VLLM_PORT": "1"}
    assert engine_env.dropped(env) == ["ALL_PROXY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "MY_API_KEY",
                                       "SAGE_LLM_GATEWAY_API_KEY_ENV", "SAGE_LLM_GW_KEY_ABC123", "VLLM_PORT"]
    over = engine_env.overrides(env)
    assert over["NO_PROXY"] == "corp.example,127.0.0.1,localhost,::1"
    assert over["MY_API_KEY"] is None


# ------------------------------------------------------------------------------------------------ pathological JSON
@pytest.mark.parametrize(("body", "words"), [
    (b'{"model": "org/Tiny-Chat", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"model": "org/Tiny-Chat", "model": "org/Tiny-Other", "messages": []}', "'model' twice"),
    (b'{"model": "org/Tiny-Chat", "messages": [], "temperature": NaN}', "NaN"),
    (b'{"model": "org/Tiny-Chat", "messages": [], "temperature": -Infinity}', "-Infinity"),
    (b'{"model": "org/Tiny-Chat", "messages": [], "max_tokens": 1' + b"0" * 5000 + b"}", "malformed JSON"),
    (b'{"model": ["org/Tiny-Chat"], "messages": []}', "must be a string"),
    (b'{"model": {"$ne": null}, "messages": []}', "must be a string"),
    (b'{"model": "' + b"m" * 100_000 + b'", "messages": []}', "characters long"),
    (b'{"model": "org/Tiny-Chat\\u0000", "messages": []}', "control characters"),
    (b'[{"model": "org/Tiny-Chat"}]', "must be an object"),
    (b'"org/Tiny-Chat"', "must be an object"),
    (b'\xff\xfe{"model": 1}', "malformed JSON"),
])
def test_pathological_json_is_a_400_that_loads_nothing(gateway, home, body, words) -> None:
    gw = gateway()
    status, _, answer = raw_request(gw.gw.opts.port, "POST", "/v1/chat/completions", body)
    assert status == 400, answer[:300]
    error = json.loads(answer)["error"]
    assert words in error["message"], error
    assert len(error["message"]) < 400  # never the whole body echoed back
    assert engine_starts(home) == 0
    assert gw.client.get("/health").status_code == 200


def test_big_but_valid_bodies_still_pass(gateway) -> None:
    gw = gateway()
    r = gw.chat(MODEL_A, extra={"x": [[[[{"a": 1}]]]] * 2000, "n": 10**300, "e": 1e308})
    assert r.status_code == 200, r.text


def test_management_routes_read_bodies_as_strictly(gateway, home) -> None:
    gw = gateway()
    port = gw.gw.opts.port
    for body in (b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                 b'{"model": "org/Tiny-Chat", "model": "org/Tiny-Other"}', b'{"model": "org/Tiny-Chat", "port": NaN}'):
        status, _, answer = raw_request(port, "POST", "/api/local-engine/start", body)
        assert status == 400, answer[:300]
    assert engine_starts(home) == 0


def test_an_upstream_page_cannot_run_on_the_gateways_origin(gateway, cloud) -> None:
    """An upstream (a cloud, an --upstream route, an external engine) that answers text/html must not get a page
    onto the gateway's origin, where the panel keeps its key: sandboxed, no sniffing."""
    cloud.content_type = "text/html"
    gw = gateway()
    status, headers, _ = raw_request(gw.gw.opts.port, "POST", "/v1/chat/completions", CLOUD_CHAT)
    assert status == 200
    assert headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert headers["x-content-type-options"] == "nosniff"


def test_huge_bodies_are_bounded_and_parsed_off_the_event_loop(gateway, home, monkeypatch) -> None:
    import threading

    from sage_llm.gateway import bodies

    gw = gateway()
    port = gw.gw.opts.port
    # valid JSON, well under --max-body, millions of values: refused before parsing
    status, _, answer = raw_request(port, "POST", "/v1/chat/completions",
                                    b'{"model": "org/Tiny-Chat", "x": [' + b"{}," * 3_000_000 + b"{}]}")
    assert status == 400
    assert "values" in json.loads(answer)["error"]["message"]
    assert engine_starts(home) == 0
    # a large body that is accepted is parsed in a worker thread, not on the loop that relays every stream
    loop_thread = gw.call(lambda: _async(threading.get_ident))
    seen: list[int] = []
    real = bodies.parse_object
    monkeypatch.setattr(bodies, "parse_object", lambda raw: (seen.append(threading.get_ident()), real(raw))[1])
    r = gw.chat(MODEL_A, extra={"padding": "x" * (2 << 20)})
    assert r.status_code == 200, r.text
    assert seen
    assert all(t != loop_thread for t in seen)
    assert gw.chat(MODEL_A).status_code == 200  # a small one stays on the loop: no thread hop on the hot path
    assert seen[-1] == loop_thread


async def _async(fn):
    return fn()
