"""`sage llm bench` end to end against an engine started through the CLI (the fake vLLM)."""

from __future__ import annotations

import json

import pytest

from tests.support.ports import free_port

pytestmark = pytest.mark.usefixtures("fake_vllm", "stop_all")


def test_bench_an_engine_by_name_with_json(cli, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_REPLY", "one two three four five six")
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY_S", "0.002")
    port = str(free_port())
    code, _out, err = cli("start", "org/model-a", "--name", "b1", "--port", port)
    assert code == 0, err
    code, out, err = cli("bench", "b1", "--concurrency", "4", "--requests", "12", "--max-tokens", "4", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["engine"] == "b1"
    assert doc["model"] == "org/model-a"
    assert doc["completed"] == 12
    assert doc["total_output_tokens"] == 48  # the reply cut at max_tokens=4
    sm = doc["server_metrics"]
    assert sm["available"] is True
    assert sm["generation_tokens"] == 48
    assert sm["generation_tokens_match"] is True
    assert sm["prompt_tokens_match"] is True
    assert doc["ttft_s"]["p50"] >= 0.002
    assert "bench b1: 12 requests, concurrency 4" in err
    # by port, human output: a table on stdout
    code, out, err = cli("bench", port, "-c", "2", "-n", "4")
    assert code == 0, err
    assert "TTFT (ms)" in out
    assert "(match)" in out


def test_bench_refuses_unknown_or_ambiguous_targets(cli):
    code, _out, err = cli("bench", "nope")
    assert code == 2
    assert "no engine named or on port 'nope'" in err
    code, _out, err = cli("bench", "--url", "http://127.0.0.1:19699/v1")
    assert code == 2
    assert "--url needs --model" in err


def test_bench_reports_failures_with_exit_1(cli):
    code, out, err = cli("bench", "--url", f"http://127.0.0.1:{free_port()}/v1", "--model", "m", "-n", "3", "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["failed"] == 3
    assert "request(s) failed" in err
