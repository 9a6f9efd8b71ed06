"""The load generator against a real local streaming server (tests/fakes/fast_sse.py), both transports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sage_llm.bench import loadgen
from tests.support.ports import free_port

FAST_SSE = Path(__file__).resolve().parents[1] / "fakes" / "fast_sse.py"


@pytest.fixture
def sse_server(monkeypatch):
    procs = []

    def start(tokens: int = 5, delay_ms: float = 0.0, fail_every: int = 0) -> str:
        port = free_port()
        env = {"FAST_SSE_FAIL_EVERY": str(fail_every), "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen([sys.executable, str(FAST_SSE), str(port), "--tokens", str(tokens), "--delay-ms",
                                 str(delay_ms)], stdout=subprocess.PIPE, env=env)
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().strip() == f"ready {port}"
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("transport", ["raw", "httpx"])
def test_counts_latencies_and_cross_check(sse_server, transport):
    url = sse_server(tokens=5, delay_ms=2)
    cfg = loadgen.BenchConfig(base_url=url, model="fast", concurrency=4, requests=20, prompt_tokens=10, max_tokens=5)
    seen = []
    doc = loadgen.run_sync(cfg, on_progress=seen.append, transport=transport).to_json()
    assert doc["completed"] == 20
    assert doc["failed"] == 0
    assert doc["total_output_tokens"] == 100
    assert doc["total_prompt_tokens"] == 200  # the server's usage: 10 words each
    assert doc["token_counts_from"] == "usage"
    assert doc["server_metrics"] == {"available": True, "generation_tokens": 100, "prompt_tokens": 200,
                                     "generation_tokens_match": True, "prompt_tokens_match": True, "note": None}
    ttft, itl = doc["ttft_s"], doc["itl_s"]
    assert 0.0015 < ttft["p50"] < 1.0  # the server waits 2 ms before the first token
    assert ttft["p50"] <= ttft["p90"] <= ttft["p99"]
    # 2 ms between tokens; a busy client may read two chunks at once (a ~0 gap, then a longer one): the mean holds
    assert 0.001 < itl["mean"] < 1.0
    assert doc["request_throughput"] > 0
    assert doc["output_throughput"] == pytest.approx(100 / doc["duration_s"])
    assert seen
    assert seen[-1]["done"] == 20


def test_max_tokens_caps_output(sse_server):
    url = sse_server(tokens=50)
    cfg = loadgen.BenchConfig(base_url=url, model="fast", concurrency=2, requests=6, max_tokens=3)
    doc = loadgen.run_sync(cfg).to_json()
    assert doc["total_output_tokens"] == 18


def test_failed_requests_are_counted_not_fatal(sse_server):
    url = sse_server(fail_every=4)
    cfg = loadgen.BenchConfig(base_url=url, model="fast", concurrency=3, requests=20)
    doc = loadgen.run_sync(cfg).to_json()
    assert doc["completed"] == 15
    assert doc["failed"] == 5
    assert doc["errors"] == {"HTTP 500: injected failure": 5}


def test_unreachable_server_gives_errors_and_no_metrics():
    cfg = loadgen.BenchConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", concurrency=2, requests=4)
    doc = loadgen.run_sync(cfg).to_json()
    assert doc["failed"] == 4
    assert doc["completed"] == 0
    assert doc["server_metrics"]["available"] is False
    assert "/metrics unavailable" in doc["server_metrics"]["error"]
    assert all(k.startswith(("ConnectionRefusedError", "OSError")) for k in doc["errors"])


def test_percentiles_and_metric_parsing():
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert loadgen.percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    text = ("# TYPE vllm:generation_tokens_total counter\n"
            'vllm:generation_tokens_total{engine="0",model_name="a"} 12.0\n'
            'vllm:generation_tokens_total{engine="1",model_name="a"} 3.0\n'
            'vllm:prompt_tokens_total{engine="0",model_name="a"} 7.0\n'
            'vllm:prompt_tokens_created{engine="0",model_name="a"} 1.7e9\n')
    assert loadgen.parse_metrics(text) == {"vllm:generation_tokens_total": 15.0, "vllm:prompt_tokens_total": 7.0}


def test_bad_config_is_a_usage_error():
    from sage_llm.core.errors import UsageError

    with pytest.raises(UsageError, match="--concurrency 0"):
        loadgen.BenchConfig(base_url="http://x/v1", model="m", concurrency=0).validate()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Transport:
    def __init__(self) -> None:
        self.closed = False
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


RESPONSE = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            + _chunk(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
            + _chunk(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choices":[{"delta":{"content":"b"}}]}'
                     b"\n\n")
            + _chunk(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n')
            + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


@pytest.mark.parametrize("step", [1, 2, 7, 64, len(RESPONSE)])
def test_raw_protocol_parses_a_response_cut_anywhere(step):
    import asyncio

    async def go():
        proto = loadgen._HttpProtocol()
        proto.connection_made(_Transport())
        res = loadgen.RequestResult(ok=False)
        stream = loadgen._Stream(res, 0.0)
        waiter = proto.send(b"POST ...", stream)
        for i in range(0, len(RESPONSE), step):
            assert not waiter.done()
            proto.data_received(RESPONSE[i:i + step])
        assert waiter.done()
        await waiter
        return stream.finish()

    res = asyncio.run(go())
    assert res.ok
    assert res.output_tokens == 2
    assert res.prompt_tokens == 3
    assert res.ttft is not None
    assert len(res.itl) == 1


def test_raw_protocol_reports_an_error_event_and_a_closed_connection():
    import asyncio

    async def go(data: bytes, close: bool):
        proto = loadgen._HttpProtocol()
        proto.connection_made(_Transport())
        res = loadgen.RequestResult(ok=False)
        waiter = proto.send(b"POST ...", loadgen._Stream(res, 0.0))
        proto.data_received(data)
        if close:
            proto.connection_lost(None)
        with pytest.raises((RuntimeError, ConnectionError)) as info:
            await waiter
        return str(info.value)

    err = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + _chunk(
        b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
    assert asyncio.run(go(err, False)) == "engine died"
    assert "closed" in asyncio.run(go(RESPONSE[:60], True))


def _tokenizer_server(template: int, per_word) -> tuple[object, list[str]]:
    """An httpx transport whose POST /tokenize counts `template` + per_word(word) tokens per message."""
    import httpx

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        seen.append(request.url.path)
        if request.url.path != "/tokenize":
            return httpx.Response(404, json={"detail": "Not Found"})
        msgs = json.loads(request.content)["messages"]
        count = sum(template + sum(per_word(w) for w in m["content"].split()) for m in msgs)
        return httpx.Response(200, json={"count": count, "max_model_len": 4096, "tokens": []})

    return httpx.MockTransport(handler), seen


@pytest.mark.parametrize(("template", "target"), [(9, 32), (30, 32), (9, 500), (3, 6)])
def test_prompt_plan_hits_the_target_with_multi_token_words(template, target):
    """Words of 1-4 tokens (a small vocabulary): bisection on words, then one-token letters close the gap."""
    import asyncio

    import httpx

    transport, seen = _tokenizer_server(template, lambda w: 1 if w == "a" else 1 + len(w) // 2)

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await loadgen.plan_prompt(client, "http://engine", "m", target, {})

    plan = asyncio.run(go())
    assert (plan.method, plan.counted, plan.note) == ("tokenize", target, None)
    assert len(seen) <= 2 * target.bit_length() + 4  # a bisection, not one request per token


def test_prompt_plan_without_tokenize_falls_back_to_words():
    import asyncio

    import httpx

    transport, _seen = _tokenizer_server(0, lambda w: 1)

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await loadgen.plan_prompt(client, "http://engine/nothing-here", "m", 12, {})

    plan = asyncio.run(go())
    assert plan.method == "words"
    assert plan.counted is None
    assert len(plan.text.split()) == 12
    assert "/tokenize is unavailable" in plan.note


def test_prompt_deviation_is_reported_beyond_ten_percent():
    assert loadgen.prompt_deviation({"prompt_tokens": 32, "prompt_tokens_per_request": 35}) is None
    assert loadgen.prompt_deviation({"prompt_tokens": 32, "prompt_tokens_per_request": 98,
                                     "prompt": {"note": "why"}}) == \
        "each request sent 98 prompt tokens as the engine counted them, not the 32 asked: why"
