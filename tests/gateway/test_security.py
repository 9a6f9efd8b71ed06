"""Priority 4: what a web page in the user's browser could send is refused; API key on every route."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.gateway.conftest import MODEL_A, engine_starts

CHAT = b'{"model": "org/Tiny-Chat", "messages": [{"role": "user", "content": "hi"}]}'


def test_dns_rebinding_host_is_refused(gateway) -> None:
    gw = gateway()
    port = gw.gw.opts.port
    for host in ("evil.example", f"evil.example:{port}", "attacker.127.0.0.1.nip.io"):
        r = gw.client.get("/v1/models", headers={"Host": host})
        assert r.status_code == 403, host
        assert r.json()["error"]["code"] == "forbidden_host"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", f"studio.localhost:{port}"):
        assert gw.client.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_cross_site_requests_are_refused_and_load_nothing(gateway, home) -> None:
    gw = gateway()
    # a <form> or fetch(no-cors) POST: text/plain body, foreign Origin -> no model load, no state change
    r = gw.client.post("/v1/chat/completions", content=CHAT,
                       headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code == 403
    r = gw.client.post("/v1/chat/completions", content=CHAT, headers={"Content-Type": "application/json",
                                                                      "Origin": "null"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden_origin"
    # same-origin-less text/plain (e.g. a sandboxed page without Origin): still not JSON -> 415
    r = gw.client.post("/api/local-engine/start", content=b'{"model": "org/Tiny-Chat"}',
                       headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = gw.client.post("/api/local-engine/start", content=b"model=org/Tiny-Chat",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert engine_starts(home) == 0
    # a loopback origin (a local web UI) with JSON is fine
    ok = gw.client.post("/v1/chat/completions", content=CHAT, headers={"Content-Type": "application/json",
                                                                       "Origin": "http://localhost:8765"})
    assert ok.status_code == 200


def test_api_key_on_every_route(gateway, monkeypatch) -> None:
    monkeypatch.setenv("GW_TEST_KEY", "s3cret-key")
    gw = gateway(api_key_env="GW_TEST_KEY")
    for path in ("/health", "/v1/models", "/metrics", "/api/local-engine/status", "/api/events"):
        r = gw.client.get(path)
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
    assert gw.client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    good = {"Authorization": "Bearer s3cret-key"}
    assert gw.client.get("/v1/models", headers=good).status_code == 200
    assert gw.chat(MODEL_A, headers=good).status_code == 200


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--api-key-env", "NOT_SET_ANYWHERE_X"], ["--port", "0"],
                                  ["--ttl", "soon"], ["--max-engines", "-1"], ["--upstream", "nourl"]])
def test_bad_options_exit_2_with_one_line(args, cli) -> None:
    code, out, err = cli("gateway", "run", *args)
    assert code == 2
    assert err.startswith("Error: ")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_status_json_path_never_imports_aiohttp(home) -> None:
    code = ("import sys; from sage_llm.cli.fast_status import status_json; status_json(None); "
            "assert 'aiohttp' not in sys.modules, 'aiohttp imported'; "
            "assert 'sage_llm.gateway.server' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_gateway_never_forwards_engine_dev_routes(gateway) -> None:
    gw = gateway()
    gw.chat(MODEL_A)
    for path in ("/sleep?level=1", "/wake_up", "/collective_rpc", "/v1/../sleep"):
        r = gw.client.post(path, content=b"{}", headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 404), path
    assert httpx.get(f"{gw.url}/is_sleeping").status_code == 404


@pytest.mark.parametrize(("host", "ok"), [("localhost:8901", True), ("127.0.0.1", True), ("[::1]:8901", True),
                                          ("127.0.0.2:8901", True), ("app.localhost", True), ("", False),
                                          (None, False), ("evil.example:8901", False),
                                          ("localhost.evil.example", False), ("0.0.0.0:8901", False),
                                          ("192.168.1.10:8901", False)])
def test_host_rule(host, ok) -> None:
    from sage_llm.gateway.security import host_ok

    assert host_ok(host, "127.0.0.1") is ok


@pytest.mark.parametrize(("origin", "ok"), [(None, True), ("http://localhost:8765", True), ("http://127.0.0.1", True),
                                            ("https://[::1]:3000", True), ("null", False), ("", False),
                                            ("http://evil.example", False), ("file://", False),
                                            ("http://localhost.evil.example", False),
                                            ("http://studio.example:8765", True)])
def test_origin_rule(origin, ok) -> None:
    from sage_llm.gateway.security import origin_ok

    assert origin_ok(origin, "127.0.0.1", 8901, ["http://studio.example:8765/"]) is ok
