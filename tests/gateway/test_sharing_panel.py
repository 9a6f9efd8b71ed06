"""The web panel on a shared gateway (issue 22), in a real browser: it asks for a key, and a `user` key sees no
management controls and cannot stop an engine; an `admin` key can."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway.conftest import MODEL_A
from tests.gateway.test_web_panel import chromium, page, until  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(180)


def test_a_user_key_sees_no_stop_button_and_cannot_stop(gateway, page, home: Path) -> None:  # noqa: F811
    from sage_llm.gateway import keys

    _, user = keys.add("alice", "user")
    _, admin = keys.add("bob", "admin")
    gw = gateway()
    r = gw.post("/api/local-engine/start?wait=1", {"model": MODEL_A}, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text
    engine = r.json()["engine"]

    page.goto(gw.url + "/")
    page.wait_for_selector("#key-box:not(.hidden)")  # the page asks for a key
    page.fill("#key-input", user)
    page.click("#key-btn")
    page.wait_for_load_state()
    card = page.locator(f".engine-card[data-engine='{engine}']")
    card.wait_for()
    until(page, "document.body.classList.contains('role-user')")
    assert card.locator(".stop-btn").count() == 1
    assert card.locator(".stop-btn").is_hidden()
    assert page.locator("#start-form").is_hidden()
    status = page.evaluate("""async (model) => {
        const r = await fetch('/api/local-engine/stop', {method: 'POST', body: JSON.stringify({model}),
            headers: {'Content-Type': 'application/json',
                      'Authorization': 'Bearer ' + sessionStorage.getItem('sage-llm-gateway-key')}});
        return r.status;
    }""", MODEL_A)
    assert status == 403
    assert gw.client.get("/api/local-engine/status", headers={"Authorization": f"Bearer {user}"}).json()["running"]

    page.evaluate("(k) => sessionStorage.setItem('sage-llm-gateway-key', k)", admin)
    page.reload()
    card.wait_for()
    until(page, "!document.body.classList.contains('role-user')")
    page.wait_for_selector(f".engine-card[data-engine='{engine}'] .stop-btn", state="visible")
    assert page.locator("#start-form").is_visible()
