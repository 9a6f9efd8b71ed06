"""client.ChatStream against a real OpenAI-compatible server on 127.0.0.1 (tests/fakes/fake_openai.py)."""

from __future__ import annotations

import httpx
import pytest

from sage_llm.chat.client import (
    AuthFailed,
    ChatStream,
    ContextTooLong,
    Endpoint,
    ModelNotFound,
    ServerFailed,
    ServerUnreachable,
    TurnStats,
    build_request,
    make_client,
)
from tests.fakes.fake_openai import FakeOpenAI
from tests.support.discipline import wait_for
from tests.support.ports import free_port

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def api():
    with FakeOpenAI(key="sk-good", models=("m1", "m2"), reply="Paris is the capital.") as a:
        yield a


@pytest.fixture
def http():
    c = make_client(timeout_s=10)
    yield c
    c.close()


def ep(api: FakeOpenAI, key: str = "sk-good", model: str | None = "m1") -> Endpoint:
    return Endpoint(base_url=api.base_url, model=model, api_key=key, label="cloud API", key_hint="check THE_KEY")


def test_stream_yields_pieces_and_fills_result(api, http):
    with ChatStream(http, ep(api), MSGS, temperature=0.5, max_tokens=50, extra_body={"top_k": 5}) as s:
        pieces = list(s)
    assert pieces == ["Paris ", "is ", "the ", "capital."]
    r = s.result
    assert r.text == "Paris is the capital."
    assert r.usage == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    assert r.finish_reason == "stop"
    assert r.model == "m1"
    assert 0 < r.ttft_s < 5
    assert r.tokens_per_s is not None
    assert r.tokens_per_s > 0
    sent = api.requests[-1]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["temperature"] == 0.5
    assert sent["max_tokens"] == 50
    assert sent["top_k"] == 5
    assert sent["messages"] == MSGS


def test_no_stream_returns_the_whole_text(api, http):
    with ChatStream(http, ep(api), MSGS, stream=False) as s:
        pieces = list(s)
    assert pieces == ["Paris is the capital."]
    assert s.result.usage["completion_tokens"] == 4
    assert "stream_options" not in api.requests[-1]


def test_build_request_leaves_out_unset_fields():
    body = build_request(MSGS, None, True, None, None)
    assert body == {"messages": MSGS, "stream": True, "stream_options": {"include_usage": True}}


def test_bad_key_is_401_with_hint(api, http):
    with pytest.raises(AuthFailed) as ei, ChatStream(http, ep(api, key="sk-bad"), MSGS):
        pass
    assert "refused the API key (401)" in ei.value.message
    assert ei.value.hint == "check THE_KEY"


def test_unknown_model_lists_served_models(api, http):
    with pytest.raises(ModelNotFound) as ei, ChatStream(http, ep(api, model="nope"), MSGS):
        pass
    assert ei.value.message == f"model 'nope' is not served by cloud API at {api.base_url}; it serves: m1, m2"
    assert ei.value.exit_code == 2


def test_context_too_long_names_the_max_length(api, http):
    api.max_model_len = 10
    long = [{"role": "user", "content": "word " * 50}]
    with pytest.raises(ContextTooLong) as ei, ChatStream(http, ep(api), long):
        pass
    assert "max model length is 10 tokens" in ei.value.message
    assert "needs 53" in ei.value.message
    assert "--max-model-len" in ei.value.hint


def test_server_error_is_retryable(api, http):
    api.status = 503
    with pytest.raises(ServerFailed) as ei, ChatStream(http, ep(api), MSGS):
        pass
    assert "(503)" in ei.value.message
    assert ei.value.retryable


def test_connection_refused_says_not_running(http):
    port = free_port()  # reserved for the test: nothing listens there
    e = Endpoint(base_url=f"http://127.0.0.1:{port}/v1", model="x", label="local engine 'qwen'",
                 down_hint="see `sage llm status qwen`")
    with pytest.raises(ServerUnreachable) as ei, ChatStream(http, e, MSGS):
        pass
    assert ei.value.message == f"local engine 'qwen' at http://127.0.0.1:{port}/v1 is not running (connection refused)"
    assert ei.value.hint == "see `sage llm status qwen`"
    assert ei.value.retryable


def test_dropped_mid_stream_is_unreachable(api, http):
    api.fail_after = 2
    got = []
    with pytest.raises(ServerUnreachable) as ei, ChatStream(http, ep(api), MSGS) as s:
        got.extend(s)
    assert got == ["Paris ", "is "]
    assert "in the middle of the reply" in ei.value.message or "ended the reply early" in ei.value.message


def test_error_frame_mid_stream(api, http):
    api.error_after = 1
    with pytest.raises(ServerFailed) as ei, ChatStream(http, ep(api), MSGS) as s:
        list(s)
    assert "failed in the middle of the reply: fake engine error mid-stream" in ei.value.message


def test_leaving_early_closes_the_connection(api, http):
    """Cancelling (here: break) closes the socket; the server sees the disconnect on its next write."""
    api.tokens = [f"t{i} " for i in range(200)]
    api.delay_s = 0.01
    with ChatStream(http, ep(api), MSGS) as s:
        for piece in s:
            assert piece == "t0 "
            break
    wait_for(lambda: api.disconnects, 30, what="the server to see the client disconnect")
    assert api.disconnects == 1
    # the client is still usable for the next turn
    api.tokens, api.delay_s = None, 0.0
    with ChatStream(http, ep(api), MSGS) as s2:
        assert "".join(s2) == "Paris is the capital."


def test_turn_stats_line():
    from sage_llm.chat.client import ChatResult

    r = ChatResult(usage={"prompt_tokens": 12, "completion_tokens": 11}, started=10.0, first_token_at=10.25,
                   ended=11.25)
    st = TurnStats.of(r, "local")
    assert st.ttft_s == pytest.approx(0.25)
    assert st.tokens_per_s == pytest.approx(10.0)
    assert st.line() == "ttft 0.25 s · 10.0 tokens/s · 12 prompt + 11 completion tokens · 1.25 s"


def test_keepalive_comments_and_unknown_frames_are_skipped(http):
    """Served by an httpx MockTransport: SSE comments, blank lines and event: lines are ignored."""
    body = (b": keep-alive\n\nevent: x\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n"
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"},\"finish_reason\":\"stop\"}]}\n\n"
            b"data: [DONE]\n\n")
    client = httpx.Client(transport=httpx.MockTransport(lambda req: httpx.Response(200, content=body)))
    with ChatStream(client, Endpoint(base_url="http://x/v1", model="m"), MSGS) as s:
        assert list(s) == ["a", "b"]
    assert s.result.usage is None
    assert s.result.completion_tokens == 2
