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


def test_prompt_tokens_are_what_the_engine_counts(cli):
    """--prompt-tokens N: each request's prompt is N tokens in the engine's usage, chat template included (the fake
    counts 4 per message on top of the words, so N words, as the old bench sent, would be N + 4)."""
    port = str(free_port())
    code, _out, err = cli("start", "org/model-a", "--name", "b3", "--port", port)
    assert code == 0, err
    code, out, err = cli("bench", "b3", "-c", "2", "-n", "4", "--prompt-tokens", "32", "--max-tokens", "2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["prompt_tokens"] == 32
    assert doc["prompt_tokens_per_request"] == 32
    assert doc["total_prompt_tokens"] == 4 * 32
    assert doc["prompt"] == {"method": "tokenize", "tokens": 32, "note": None}
    assert doc["server_metrics"]["prompt_tokens"] == 4 * 32
    # below the template's own size: the smallest prompt is sent, and a warning says so with the real count
    code, out, err = cli("bench", "b3", "-c", "1", "-n", "1", "--prompt-tokens", "2", "--max-tokens", "2")
    assert code == 0, err
    assert "prompt tokens/request     5 (2 asked; engine usage, calibrated with /tokenize)" in out
    assert ("Warning: each request sent 5 prompt tokens as the engine counted them, not the 2 asked: the chat "
            "template and one word are already 5 tokens, the smallest prompt this model takes") in err
