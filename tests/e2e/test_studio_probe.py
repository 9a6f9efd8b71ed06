"""Today's SAGE Studio finds a sage-llm engine by HTTP (it never calls `status --json`): the two probes, replayed.

`studio_bootstrap_probe` mirrors `bootstrap_local_llm_endpoint_from_env()` of isage-studio 0.2.4.37
(sage/studio/runtime/endpoints/bootstrap.py), minus its endpoint registry: base `http://{SAGE_LLM_HOST or
127.0.0.1}:{SAGE_LLM_PORT or 8901}`, `GET /health` (2 s), then `GET /v1/models` (2 s), chat model ids from
`data[].id` without the embedding-looking ones; the endpoint is `{base}/v1` with api key `local-token`.
`studio_start_probe` mirrors `StudioManager.is_llm_running()` (`sage studio start`): `GET /v1/models` on localhost
(1 s) for each port, 200 = running. The real function runs, from the real wheel, in test_sage_published.py; here the
copies run against an engine managed by sage-llm (the fake vLLM), and tests/integration/test_studio_probe_real.py
runs them against a real vLLM.

Gateway: when sage-llm's gateway exists, add the same two probes against it here (Studio's gateway bootstrap reads
SAGE_GATEWAY_HOST/SAGE_GATEWAY_PORT, default localhost:8889, `GET /v1/models` only).
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from tests.conftest import free_port

EMBEDDING_KEYWORDS = ("bge-", "bge_", "embed", "text-embedding", "e5-", "m3e-", "gte-")  # Studio's list


def studio_bootstrap_probe(environ: dict[str, str]) -> dict | None:
    """What Studio registers for the local engine ({base_url, model_ids, api_key}), or None when it finds none."""
    host = environ.get("SAGE_LLM_HOST", "127.0.0.1")
    port = environ.get("SAGE_LLM_PORT", "8901")
    base = f"http://{host}:{port}"
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{base}/health", headers={"Accept": "application/json"}),
                                    timeout=2):
            pass
    except Exception:
        return None
    ids: tuple[str, ...] = ()
    try:
        req = urllib.request.Request(f"{base}/v1/models", headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=2) as resp:
            data = json.loads(resp.read())
        ids = tuple(m["id"] for m in data.get("data", [])
                    if m.get("id") and not any(k in m["id"].lower() for k in EMBEDDING_KEYWORDS))
    except Exception:
        pass
    if not ids:
        fallback = environ.get("SAGE_STUDIO_LLM_MODEL", "").strip()
        if not fallback:
            return None
        ids = (fallback,)
    return {"base_url": f"{base}/v1", "model_ids": ids, "api_key": "local-token"}


def studio_start_probe(ports: list[int]) -> bool:
    """`sage studio start`'s check (it uses ports 8001 and 8901): any `GET /v1/models` answering 200 within 1 s."""
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/v1/models", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except Exception:
            continue
    return False


def studio_chat(found: dict, prompt: str = "hi") -> str:
    """One chat request the way Studio sends it to the registered endpoint (bearer `local-token`)."""
    body = json.dumps({"model": found["model_ids"][0], "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 8}).encode()
    req = urllib.request.Request(found["base_url"] + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {found['api_key']}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def test_studio_finds_a_managed_engine_on_sage_llm_port(cli, fake_vllm, stop_all) -> None:
    port = free_port()
    code, _out, err = cli("start", "org/Tiny-Chat", "--port", str(port))
    assert code == 0, err

    found = studio_bootstrap_probe({**os.environ, "SAGE_LLM_PORT": str(port)})
    assert found is not None
    assert found["base_url"] == f"http://127.0.0.1:{port}/v1"
    assert found["model_ids"] == ("org/Tiny-Chat",)
    assert studio_chat(found)
    assert studio_start_probe([free_port(), port])

    code, _out, err = cli("stop", "--all")
    assert code == 0, err
    assert studio_bootstrap_probe({**os.environ, "SAGE_LLM_PORT": str(port)}) is None
    assert not studio_start_probe([port])


@pytest.mark.parametrize("model_id", ["BAAI/bge-m3", "org/text-embedding-small"])
def test_studio_skips_embedding_models(cli, fake_vllm, stop_all, model_id: str) -> None:
    """An engine serving an embedding-looking id is not a chat endpoint for Studio (unless SAGE_STUDIO_LLM_MODEL)."""
    port = free_port()
    code, _out, err = cli("start", model_id, "--port", str(port))
    assert code == 0, err
    environ = {**os.environ, "SAGE_LLM_PORT": str(port)}
    environ.pop("SAGE_STUDIO_LLM_MODEL", None)
    assert studio_bootstrap_probe(environ) is None
