"""--allow-origin in a real browser (headless Chromium): a page of an allowed origin can call the gateway with a JSON
POST and a key (which needs a CORS preflight); a page of any other origin cannot, and loads nothing (issue 21,
defect 3)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port
from tests.gateway.conftest import MODEL_A, MODEL_B, engine_starts
from tests.gateway.test_web_panel import chromium, page  # noqa: F401  (fixtures)

FETCH = """async ([url, model]) => {
  try {
    const r = await fetch(url + "/v1/chat/completions", {method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer page-key"},
      body: JSON.stringify({model, messages: [{role: "user", content: "hi"}]})});
    return {status: r.status, body: await r.text(), engine: r.headers.get("x-sage-llm-engine")};
  } catch (e) { return {error: String(e)}; }
}"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>studio</title>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def site():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_allowed_origin_page_can_call_the_gateway_and_others_cannot(gateway, home, page, site,  # noqa: F811
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("GW_PAGE_KEY", "page-key")
    allowed = f"http://127.0.0.1:{site}"
    gw = gateway(allowed_origins=[allowed], api_key_env="GW_PAGE_KEY")
    page.goto(f"{allowed}/")
    got = page.evaluate(FETCH, [gw.url, MODEL_A])
    assert got.get("status") == 200, got
    assert "Hello from the fake vLLM." in got["body"]
    assert got["engine"] == "tiny-chat"  # an exposed header (Access-Control-Expose-Headers)
    assert engine_starts(home) == 1
    # the same page served from another origin (localhost, not allowed): the preflight is refused, nothing loads
    page.goto(f"http://localhost:{site}/")
    got = page.evaluate(FETCH, [gw.url, MODEL_B])
    assert "error" in got, got
    assert engine_starts(home) == 1
    cards = {c["id"]: c["state"] for c in gw.client.get("/v1/models", headers={"Authorization": "Bearer page-key"}
                                                        ).json()["data"]}
    assert cards[MODEL_B] == "available"
