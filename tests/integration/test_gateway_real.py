"""`sage llm gateway` in front of the real CPU vLLM: an `openai` client talks to the gateway, which loads the tiny
model on demand; an aborted stream stops generation in the engine; two models (the tiny model under a second repo id)
swap under --max-engines 1; an idle engine is unloaded after its TTL."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from sage_llm.core.state import StateStore
from tests.integration.conftest import TINY_REPLY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
SECOND = "sage-test/tiny-chat-two"


def _metric(port: int, key: str, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.MULTILINE))


@pytest.fixture
def two_models(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A private hub cache holding the tiny model twice: as itself and under SECOND (same files)."""
    import os

    src = Path(os.environ["HF_HUB_CACHE"])
    cache = tmp_path / "hub"
    cache.mkdir()
    name = "models--" + tiny_model.replace("/", "--")
    shutil.copytree(src / name, cache / name, symlinks=True)
    shutil.copytree(src / name, cache / ("models--" + SECOND.replace("/", "--")), symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return tiny_model, SECOND


@pytest.fixture
def real_gateway(real_vllm, engine_port, stop_all, monkeypatch: pytest.MonkeyPatch):
    from sage_llm.gateway import options, server
    from tests.conftest import free_port

    started = []

    def make(**kw):
        port = free_port()
        opts = options.resolve(port=port, engine_port=engine_port(), external=False, fallback=False, **kw)
        opts.refresh_s, opts.tick_s = 1.0, 0.5
        # real engines: the profile passes --enforce-eager (skips torch.compile warm-up on 2 cores)
        box = {}
        ready = threading.Event()
        t = threading.Thread(target=lambda: server.serve(opts, ready=lambda gw: (box.setdefault("gw", gw),
                                                                                  ready.set())), daemon=True)
        t.start()
        assert ready.wait(60)
        started.append((box["gw"], t))
        return box["gw"], f"http://127.0.0.1:{port}"

    yield make
    for gw, t in started:
        gw.loop.call_soon_threadsafe(gw.stop_event.set)
        t.join(120)


def _profiles(tmp_path: Path, *models: str, ttl: str | None = None) -> None:
    cfg = tmp_path / "config" / "llm.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    body = ""
    for m in models:
        body += f'[gateway.models."{m}"]\nargs = ["--enforce-eager", "--max-model-len", "512"]\n'
        if ttl:
            body += f'ttl = "{ttl}"\n'
    cfg.write_text(body)


def test_openai_client_on_demand_load_and_aborted_stream(real_gateway, two_models, tmp_path) -> None:
    import openai

    model, _second = two_models
    _profiles(tmp_path, model)
    gw, url = real_gateway(ttl="0")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600)
    ids = [m.id for m in client.models.list().data]
    assert model in ids
    t0 = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=16)
    took = time.monotonic() - t0
    assert raw.headers["x-sage-llm-source"] == "local"
    engine = raw.headers["x-sage-llm-engine"]
    assert raw.parse().choices[0].message.content.strip() == TINY_REPLY
    print(f"on-demand load + first answer: {took:.1f} s")
    rec = StateStore().load(engine)
    key = gw.router.find(model).engine.api_key
    # the engine itself refuses a request without the gateway's key
    assert httpx.post(f"http://127.0.0.1:{rec.port}/v1/chat/completions", json={"model": model, "messages": []},
                      headers={"Origin": "http://evil.example"}).status_code == 401
    # an aborted stream: the gateway closes its upstream request, vLLM stops generating
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                            temperature=0, max_tokens=480, stream=True,
                                            extra_body={"ignore_eos": True})
    got = 0
    for _chunk in stream:
        got += 1
        if got >= 3:
            break
    assert _metric(rec.port, key, "vllm:num_requests_running") >= 0
    stream.close()
    deadline = time.monotonic() + 30
    while _metric(rec.port, key, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(rec.port, key, "vllm:num_requests_running") == 0
    generated = _metric(rec.port, key, "vllm:generation_tokens_total")
    assert generated < 480 + 16  # it did not run to max_tokens


def test_two_models_swap_and_idle_unload(real_gateway, two_models, tmp_path) -> None:
    import openai

    first, second = two_models
    _profiles(tmp_path, first, second, ttl="20s")
    gw, url = real_gateway(max_engines=1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600)

    def ask(model: str) -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=16)
        return raw.headers["x-sage-llm-engine"], raw.parse().choices[0].message.content.strip()

    e1, text1 = ask(first)
    assert text1 == TINY_REPLY
    e2, text2 = ask(second)  # swap: the first engine is stopped to make room
    assert text2 == TINY_REPLY
    assert e1 != e2
    assert StateStore().load(e1) is None
    metrics = httpx.get(f"{url}/metrics").text
    assert "sage_llm_gateway_swaps_total 1" in metrics
    # idle for its TTL: unloaded, nothing left
    deadline = time.monotonic() + 90
    while StateStore().load(e2) is not None and time.monotonic() < deadline:
        time.sleep(1)
    assert StateStore().load(e2) is None
    from sage_llm.engine import inspect as engine_inspect

    views, _ = engine_inspect.inspect(include_external=False)
    assert [v.name for v in views if v.state in ("ready", "starting")] == []
