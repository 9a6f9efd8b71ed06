"""The web panel against the real CPU vLLM: start the tiny model from the page (its real load stages shown as they
happen), chat with it through the gateway, stop it from its card. Headless Chromium as in tests/gateway."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.gateway.test_web_panel import chromium, page, tab, until, watch_progress  # noqa: F401  (fixtures)
from tests.integration.test_gateway_real import _profiles, real_gateway  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_start_chat_stop_from_the_page(real_gateway, tiny_model, engine_port, page, tmp_path: Path) -> None:  # noqa: F811
    _profiles(tmp_path, tiny_model)  # --enforce-eager --max-model-len 512: a quick CPU start
    gw, url = real_gateway()
    page.goto(url + "/")
    page.wait_for_selector(f"#start-model option[value='{tiny_model}']", state="attached")
    page.select_option("#start-model", tiny_model)
    port = engine_port()
    page.fill("#start-port", str(port))
    watch_progress(page)
    page.click("#start-btn")
    page.wait_for_selector("#start-progress[data-stage=ready]", timeout=400_000)
    stages = [s for s, _pct, _label in page.evaluate("window.__seen")]
    # the stages vLLM really went through, in order, as `start` names them
    assert stages[-1] == "ready"
    assert "loading_weights" in stages
    assert "kv_cache" in stages
    assert stages.index("loading_weights") < stages.index("kv_cache") < stages.index("ready")
    engines = httpx.get(url + "/api/engines", timeout=10).json()["engines"]
    rec = next(e for e in engines if e["model"] == tiny_model)
    assert rec["port"] == port
    assert rec["state"] == "ready"

    tab(page, "chat")
    page.wait_for_selector("#source-local:not([disabled])", timeout=30_000)
    page.check("#source-local")
    page.fill("#chat-input", "Hello")
    page.click("#chat-send")
    answer = page.locator(".msg.assistant[data-done='1']")
    answer.wait_for(timeout=120_000)
    assert answer.get_attribute("data-source") == "local"
    assert answer.get_attribute("data-engine") == rec["name"]
    assert answer.locator(".content").inner_text().strip()
    assert " tokens/s · " in answer.locator(".meta").inner_text()

    tab(page, "engines")
    card = page.locator(f".engine-card[data-engine='{rec['name']}']")
    card.locator(".stop-btn").click()
    card.wait_for(state="detached", timeout=120_000)
    until(page, "document.querySelector('#status').dataset.state === 'idle'")
    assert not [e for e in httpx.get(url + "/api/engines", timeout=10).json()["engines"] if e["model"] == tiny_model]
    assert page.problems == []  # type: ignore[attr-defined]
