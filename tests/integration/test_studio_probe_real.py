"""Today's Studio finds a real vLLM (CPU build, tiny model) managed by sage-llm.

The probes of tests/e2e/test_studio_probe.py (copies of isage-studio's `bootstrap_local_llm_endpoint_from_env` and
`sage studio start`'s check), then one chat the way Studio sends it. One engine, about 30-60 s on 2 cores."""

from __future__ import annotations

import os

import pytest

from tests.e2e.test_studio_probe import studio_bootstrap_probe, studio_chat, studio_start_probe
from tests.integration.conftest import TINY_REPLY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def test_studio_finds_a_real_engine(cli, real_vllm, tiny_model, engine_port, stop_all) -> None:
    port = engine_port()
    code, _out, err = cli("start", tiny_model, "--name", "studio", "--port", str(port), "--enforce-eager",
                          "--max-model-len", "512", "--timeout", "300")
    assert code == 0, err
    found = studio_bootstrap_probe({**os.environ, "SAGE_LLM_PORT": str(port)})
    assert found is not None
    assert found["base_url"] == f"http://127.0.0.1:{port}/v1"
    assert found["model_ids"] == (tiny_model,)
    assert studio_start_probe([port])
    answer = studio_chat(found).strip()
    assert answer
    assert TINY_REPLY.startswith(answer)
    code, _out, err = cli("stop", "studio")
    assert code == 0, err
    assert studio_bootstrap_probe({**os.environ, "SAGE_LLM_PORT": str(port)}) is None
