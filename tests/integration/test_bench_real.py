"""`sage llm bench --prompt-tokens N` against the real CPU vLLM: each request sends N prompt tokens as the engine counts
them (its usage and its /metrics counter), chat template included, within 10 %; the report shows the real count.

The tiny model's tokenizer (a byte-level BPE with about 370 entries) splits common words into several tokens and its
ChatML template adds its own, so a prompt sized by words misses by far (the old bench sent 98 for 32 on Qwen)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]


@pytest.mark.usefixtures("stop_all")
def test_prompt_tokens_mean_what_they_say(cli, real_vllm, tiny_model, engine_port):
    port = engine_port()
    code, _out, err = cli("start", tiny_model, "--name", "bench-real", "--port", str(port), "--enforce-eager",
                          "--max-model-len", "512", "--timeout", "360")
    assert code == 0, err
    for asked in (32, 200):
        code, out, err = cli("bench", "bench-real", "-n", "4", "-c", "2", "--prompt-tokens", str(asked),
                             "--max-tokens", "4", "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["completed"] == 4
        assert doc["token_counts_from"] == "usage"
        assert doc["prompt"]["method"] == "tokenize", doc["prompt"]
        sent = doc["prompt_tokens_per_request"]
        assert abs(sent - asked) <= 0.1 * asked, (asked, sent, doc["prompt"])
        assert doc["prompt"]["tokens"] == sent  # /tokenize counted what the requests' usage reported
        sm = doc["server_metrics"]
        assert sm["available"] is True
        assert abs(sm["prompt_tokens"] / 4 - asked) <= 0.1 * asked, sm  # the engine's own counter agrees
        assert "each request sent" not in err  # no deviation warning
    code, out, err = cli("bench", "bench-real", "-n", "2", "-c", "1", "--prompt-tokens", "32", "--max-tokens", "2")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("prompt tokens/request"))
    assert "(32 asked; engine usage, calibrated with /tokenize)" in row, row
