"""Priority 4: what a web page in the user's browser could send is refused; API key on every route."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.gateway.conftest import MODEL_A, MODEL_B, engine_starts

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
    code = ("import sys; from sage_llm.cli.fast_status import status; status(json_=True); "
            "assert 'aiohttp' not in sys.modules, 'aiohttp imported'; "
            "assert 'sage_llm.gateway.server' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def raw_request(port: int, method: str, target: str, body: bytes = b"", headers: tuple[str, ...] = ()
                ) -> tuple[int, dict[str, str], bytes]:
    """Send one request as raw bytes (no client library to normalise the target) and read the whole answer:
    (status, headers with lower-case names, body)."""
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    if body or method in ("POST", "PUT", "PATCH"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    head += "".join(h + "\r\n" for h in headers)
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        while chunk := sock.recv(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if hdrs.get("transfer-encoding") == "chunked":
        out = b""
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        rest = out
    return int(lines[0].split()[1]), hdrs, rest


DEV_TARGETS = ("/v1/%252e%252e/sleep?level=1", "/v1/%2e%2e/sleep?level=1", "/v1/..%2fsleep?level=1",
               "/v1/%2E%2E/wake_up", "/v1/%252e%252e/collective_rpc", "/v1/..%5ccollective_rpc",
               "/v1/../sleep?level=1", "/v1/models/../../wake_up", "/v1//../sleep", "/v1/%2fsleep",
               "/%76%31/../sleep", "/v1/%25252e%25252e/sleep", "/v1/load_lora_adapter", "/sleep?level=1",
               "/wake_up", "/collective_rpc")


def test_gateway_never_forwards_engine_dev_routes(gateway, tmp_path, monkeypatch) -> None:
    """Raw request targets (no client normalises them): nothing reaches an engine outside /v1/ (issue 21 defect 2)."""
    seen = tmp_path / "engine-requests.log"
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    monkeypatch.setenv("FAKE_VLLM_REQUEST_LOG", str(seen))
    gw = gateway(sleep=True)
    gw.gw.router.cpu = False  # as on a GPU host: the engine serves vLLM's dev routes (sleep, wake_up, ...)
    monkeypatch.setattr("sage_llm.gateway.engines.is_cpu_engine", lambda: False)
    assert gw.chat(MODEL_A).status_code == 200
    port = gw.gw.opts.port
    for target in DEV_TARGETS:
        status, _, answer = raw_request(port, "POST", target, b'{"model": "org/Tiny-Chat"}')
        assert status in (400, 404, 405), (target, status, answer)
    posts = [line.split(" ", 1)[1] for line in seen.read_text().splitlines() if line.startswith("POST ")]
    assert posts == ["/v1/chat/completions"], posts  # the chat above; no attack reached the engine at all
    # what was checked is what is forwarded: an ordinary percent-encoded path arrives as sent
    status, _, _ = raw_request(port, "POST", "/v1/chat%2Dcompletions", b'{"model": "org/Tiny-Chat"}')
    assert "POST /v1/chat%2Dcompletions" in seen.read_text().splitlines()
    assert gw.client.get("/v1/models").status_code == 200


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "GET", "TRACE", "FOO"])
def test_only_post_loads_a_model(gateway, home, method) -> None:
    """No method but POST loads or evicts: a page can send HEAD/OPTIONS/GET without a preflight (defect 3)."""
    gw = gateway(max_engines=1)
    assert gw.chat(MODEL_A).status_code == 200
    port = gw.gw.opts.port
    body = b'{"model": "org/Tiny-Other", "messages": [{"role": "user", "content": "hi"}]}'
    for target in ("/v1/chat/completions?model=org/Tiny-Other", "/v1/models?model=org/Tiny-Other",
                   "/tokenize?model=org/Tiny-Other"):
        for with_body in (b"", body):
            status, _, answer = raw_request(port, method, target, with_body,
                                            headers=("Access-Control-Request-Method: POST",))
            assert status >= 400 or (method in ("GET", "HEAD") and target.startswith("/v1/models")), \
                (method, target, status, answer)
    assert engine_starts(home) == 1
    cards = {c["id"]: c["state"] for c in gw.client.get("/v1/models").json()["data"]}
    assert cards[MODEL_A] == "ready"
    assert cards[MODEL_B] == "available"


def test_cors_preflight_for_allowed_origins_only(gateway, home) -> None:
    """--allow-origin works for a browser page: preflights answered for it, refused (403, nothing loaded) for
    others; its responses carry Access-Control-Allow-Origin (defect 3)."""
    studio = "http://studio.example:8765"
    gw = gateway(allowed_origins=[studio])
    port = gw.gw.opts.port
    ask = ("Access-Control-Request-Method: POST", "Access-Control-Request-Headers: authorization, content-type")
    status, headers, _ = raw_request(port, "OPTIONS", "/v1/chat/completions", headers=(f"Origin: {studio}", *ask))
    assert status == 204
    assert headers["access-control-allow-origin"] == studio
    assert "POST" in headers["access-control-allow-methods"]
    assert "content-type" in headers["access-control-allow-headers"].lower()
    assert "authorization" in headers["access-control-allow-headers"].lower()
    for origin in ("http://evil.example", "null", "http://studio.example:8766"):
        status, headers, _ = raw_request(port, "OPTIONS", "/v1/chat/completions?model=org/Tiny-Chat",
                                         headers=(f"Origin: {origin}", *ask))
        assert status == 403, origin
        assert "access-control-allow-origin" not in headers
    assert engine_starts(home) == 0
    # the page's real request then gets the header that lets it read the answer; another origin's does not
    status, headers, answer = raw_request(port, "POST", "/v1/chat/completions", CHAT, headers=(f"Origin: {studio}",))
    assert status == 200, answer
    assert headers["access-control-allow-origin"] == studio
    status, headers, _ = raw_request(port, "GET", "/v1/models", headers=("Origin: http://evil.example",))
    assert "access-control-allow-origin" not in headers
    # without --allow-origin there is no CORS at all
    gw.stop()  # one gateway per state directory
    gw2 = gateway()
    status, headers, _ = raw_request(gw2.gw.opts.port, "OPTIONS", "/v1/chat/completions",
                                     headers=(f"Origin: {studio}", *ask))
    assert status == 403
    assert "access-control-allow-origin" not in headers


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
