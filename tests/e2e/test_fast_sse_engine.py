"""tests/fakes/fast_sse.py in its vLLM form: `sage llm start` runs it as an engine, `status` sees it ready, and the
bench client's token counts match its /metrics (what bench/bench_gateway.py relies on)."""

from __future__ import annotations

import json
import sys

from sage_llm.bench import loadgen
from tests.conftest import free_port
from tests.unit.test_loadgen import FAST_SSE


def test_started_as_an_engine_and_benched(cli, monkeypatch, stop_all):
    monkeypatch.setenv("SAGE_LLM_VLLM", f"{sys.executable} {FAST_SSE}")
    monkeypatch.setenv("FAST_SSE_TOKENS", "3")
    port = free_port()
    code, out, err = cli("start", "bench/fast", "--port", str(port), "--name", "fast")
    assert code == 0, err
    code, out, err = cli("status", "--json")
    eng = next(e for e in json.loads(out)["engines"] if e["name"] == "fast")
    assert (eng["state"], eng["served_model_name"], eng["port"]) == ("ready", "bench/fast", port)

    cfg = loadgen.BenchConfig(base_url=eng["base_url"], model="bench/fast", concurrency=4, requests=12,
                              max_tokens=64)
    doc = loadgen.run_sync(cfg).to_json()
    assert (doc["completed"], doc["failed"], doc["total_output_tokens"]) == (12, 0, 36)
    assert doc["server_metrics"]["generation_tokens_match"] is True
    assert cli("stop", "fast")[0] == 0
