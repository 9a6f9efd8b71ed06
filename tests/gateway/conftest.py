"""Fixtures for the gateway's fast tier: a real gateway (aiohttp, real sockets) in a thread of the test process,
starting fake vLLM engines (tests/fakes/fake_vllm.py) on demand from a test Hugging Face cache."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli.test_models_cli import LLAMA, cache_model
from tests.conftest import free_port

MODEL_A = "org/Tiny-Chat"
MODEL_B = "org/Tiny-Other"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cache_model(cache, MODEL_A, LLAMA)
    cache_model(cache, MODEL_B, LLAMA)
    return cache


class Running:
    def __init__(self, gw: Any, thread: threading.Thread) -> None:
        self.gw = gw
        self.thread = thread
        self.url = f"http://127.0.0.1:{gw.opts.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return self.client.post(path, json=body, **kw)

    def chat(self, model: str, stream: bool = False, extra: dict[str, Any] | None = None, **kw: Any
             ) -> httpx.Response:
        return self.post("/v1/chat/completions", {"model": model, "stream": stream, **(extra or {}),
                                                   "messages": [{"role": "user", "content": "hi"}]}, **kw)

    def call(self, fn: Any) -> Any:
        """Run `fn()` (a coroutine function) on the gateway's loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(fn(), self.gw.loop).result(60)

    def stop(self) -> None:
        self.client.close()
        if self.thread.is_alive():
            self.gw.loop.call_soon_threadsafe(self.gw.stop_event.set)
            self.thread.join(60)


@pytest.fixture
def gateway(fake_vllm, hub, monkeypatch: pytest.MonkeyPatch, stop_all):
    """gateway(**options) -> Running; every gateway started is stopped (with its engines) at teardown."""
    from sage_llm.gateway import options, server

    started: list[Running] = []

    def make(**kw: Any) -> Running:
        kw.setdefault("port", free_port())
        kw.setdefault("engine_port", free_port())
        kw.setdefault("external", False)  # other sessions' engines on this machine are not ours to route to
        refresh = kw.pop("refresh_s", 0.3)
        tick = kw.pop("tick_s", 0.1)
        max_body = kw.pop("max_body", None)
        place_s = kw.pop("place_s", None)
        opts = options.resolve(**kw)
        opts.refresh_s, opts.tick_s = refresh, tick
        if place_s is not None:
            opts.place_s = place_s
        if max_body:
            opts.max_body = max_body
        box: dict[str, Any] = {}
        ready = threading.Event()

        def run() -> None:
            try:
                server.serve(opts, ready=lambda gw: (box.setdefault("gw", gw), ready.set()))
            except BaseException as exc:  # surfaced below
                box["error"] = exc
                ready.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert ready.wait(30), "gateway did not start"
        if "error" in box:
            raise box["error"]
        r = Running(box["gw"], t)
        started.append(r)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if r.client.get("/health").status_code == 200:
                    break
            time.sleep(0.05)
        return r

    yield make
    for r in started:
        r.stop()


def engine_starts(home: Path) -> int:
    """How many engines were spawned (one header line per start in the logs)."""
    n = 0
    for log in (home / "logs").glob("*.log"):
        n += log.read_text(errors="replace").count("===== sage llm start ")
    return n


def sse_events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line[6:].strip() != "[DONE]":
            out.append(json.loads(line[6:]))
    return out
