"""A gateway a lab can share (issue 22): keys per person, roles, model rules, hot reload, usage, limits.

Fast tier: a real gateway in the test process over real sockets, starting the fake vLLM on demand."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import MODEL_A, MODEL_B, sse_events


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------------------ the key file
def test_keys_are_prefixed_hashed_private_and_listed_without_secrets(home: Path) -> None:
    from sage_llm.gateway import keys

    key, secret = keys.add("alice", "user", ["org/*"], max_concurrency=2, tokens_per_minute=1000)
    assert secret.startswith("sk-sage-")
    assert len(secret) >= len("sk-sage-") + 43
    f = keys.path()
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    text = f.read_text()
    assert secret not in text
    assert secret[8:] not in text
    assert keys.digest(secret) in text
    listed = [k.public() for k in keys.listing()]
    assert listed == [{"name": "alice", "role": "user", "models": ["org/*"], "max_concurrency": 2,
                       "tokens_per_minute": 1000, "created": key.created}]
    assert "hash" not in json.dumps(listed)
    _, new = keys.rotate("alice")
    assert new != secret
    assert keys.digest(new) in f.read_text()
    assert keys.digest(secret) not in f.read_text()


def test_two_admins_adding_and_revoking_at_once_lose_nothing(home: Path) -> None:
    from sage_llm.gateway import keys

    for n in range(10):
        keys.add(f"old{n}")

    def admin(which: int) -> None:
        for n in range(15):
            keys.add(f"a{which}-{n}")
            if n < 5:
                keys.remove(f"old{which * 5 + n}")

    threads = [threading.Thread(target=admin, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    names = {k.name for k in keys.listing()}
    assert names == {f"a{w}-{n}" for w in (0, 1) for n in range(15)}


@pytest.mark.parametrize(("args", "needle"), [(["add", "a b"], "not a plain name"), (["add", "x", "--role", "root"],
                                                                                  "not a role"),
                                          (["add", "x", "--max-concurrency", "0"], "at least 1"),
                                          (["rm", "nobody"], "no key named"), (["rotate", "nobody"], "no key named")])
def test_keys_cli_bad_input_is_one_line_exit_2(cli, home: Path, args: list[str], needle: str) -> None:
    code, out, err = cli("gateway", "keys", *args)
    assert code == 2, err
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (home / "gateway-keys.json").exists() or "x" not in (home / "gateway-keys.json").read_text()


def test_keys_cli_prints_the_secret_once_alone_on_stdout(cli, home: Path) -> None:
    code, out, err = cli("gateway", "keys", "add", "carol", "--models", "org/*", "--tokens-per-minute", "500")
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("sk-sage-")
    assert "\n" not in secret
    code, out, _ = cli("gateway", "keys", "list", "--json")
    assert code == 0
    assert secret not in out
    assert "hash" not in out
    assert json.loads(out)[0]["tokens_per_minute"] == 500
    code, out, _ = cli("gateway", "keys", "list")
    assert "carol" in out
    assert secret not in out
    assert cli("gateway", "keys", "rm", "carol")[0] == 0
    assert json.loads(cli("gateway", "keys", "list", "--json")[1]) == []


# ------------------------------------------------------------------------------------------------ the meter
@pytest.mark.parametrize("step", [1, 7, 64, 100000])
def test_the_meter_reads_usage_and_drops_only_its_own_chunk_however_the_stream_is_cut(step: int) -> None:
    from sage_llm.gateway.usage import Meter

    base = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    events = [f"data: {json.dumps({**base, 'choices': [{'delta': {'content': f'w{i} '}}]})}\n\n" for i in range(5)]
    usage = f"data: {json.dumps({**base, 'choices': [], 'usage': {'prompt_tokens': 9, 'completion_tokens': 5}})}\n\n"
    stream = ("".join(events) + usage + "data: [DONE]\n\n").encode()
    for strip in (True, False):
        finished: list[tuple[int, int, int]] = []

        def done(meter: Meter, status: int, _sse: bool, into: list = finished) -> None:
            into.append((status, meter.prompt, meter.completion))

        m = Meter("k", "m", strip, done)
        shown = b"".join(m.feed(stream[i:i + step], True) for i in range(0, len(stream), step))
        m.finish(200)
        assert finished == [(200, 9, 5)]
        want = ("".join(events) + ("" if strip else usage) + "data: [DONE]\n\n").encode()
        assert shown == want


def test_the_usage_file_rotates_and_is_summed_across_rotations(home: Path) -> None:
    from sage_llm.gateway import usage

    log = usage.UsageLog(rotate_bytes=1000)
    for i in range(40):  # about 150 bytes a line: several rotations, fewer than KEEP
        log.record("alice" if i % 2 else "bob", "m", 200 if i % 5 else 500, 3, 2, bool(i % 3))
    log.close()
    rotated = sorted(p.name for p in home.glob("gateway-usage.jsonl.*"))
    assert rotated
    assert len(rotated) <= usage.KEEP
    assert stat.S_IMODE((home / "gateway-usage.jsonl").stat().st_mode) == 0o600
    rows = {r.key: r for r in usage.summarize(by="key")}
    assert rows["alice"].requests + rows["bob"].requests == 40
    assert rows["alice"].prompt_tokens == 60
    assert rows["bob"].errors == 4  # i = 0, 10, 20, 30
    old = usage.summarize(since=time.time() + 60, by="model")
    assert old == []


# ------------------------------------------------------------------------------------------------ the gateway
def test_without_keys_the_loopback_gateway_works_as_before(gateway) -> None:
    gw = gateway()
    studio = bearer("local-token")  # SAGE Studio's probe: GET /health, then GET /v1/models with its fixed key
    assert gw.client.get("/health", headers=studio).status_code == 200
    assert gw.client.get("/v1/models", headers=studio).status_code == 200
    r = gw.chat(MODEL_A, headers=studio)
    assert r.status_code == 200
    assert "usage" in r.json()
    assert gw.client.get("/api/gateway").json()["access"]["required"] is False
    assert not (Path(os.environ["SAGE_LLM_HOME"]) / "gateway-usage.jsonl").exists()  # no keys: no accounting


def test_roles_models_and_hot_reload(gateway, home: Path, caplog) -> None:
    from sage_llm.gateway import keys

    gw = gateway()
    assert gw.client.get("/v1/models").status_code == 200  # no key file yet: open (loopback)
    _, alice = keys.add("alice", "user", [MODEL_A])  # the running gateway sees it on the next request
    _, bob = keys.add("bob", "admin")

    r = gw.client.get("/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert gw.client.get("/health").status_code == 200  # health and the panel's files need no key
    assert gw.client.get("/").status_code == 200
    bad = gw.client.get("/v1/models", headers=bearer("sk-sage-notakeyatall-0123456789"))
    assert bad.status_code == 401
    assert "\n" not in bad.json()["error"]["message"]
    assert "notakeyatall" not in caplog.text  # only the first characters of a refused key are logged
    assert gw.client.get("/v1/models", headers={"x-api-key": alice}).status_code == 200

    assert gw.chat(MODEL_A, headers=bearer(alice)).status_code == 200
    denied = gw.chat(MODEL_B, headers=bearer(alice))
    assert denied.status_code == 403
    assert MODEL_A in denied.json()["error"]["message"]
    assert denied.json()["error"]["code"] == "model_not_allowed"
    for method, path in (("POST", "/api/local-engine/stop"), ("POST", "/api/local-engine/start"),
                         ("POST", "/api/models/pull"), ("GET", "/api/engines/x/logs")):
        r = gw.client.request(method, path, json={"model": MODEL_A}, headers=bearer(alice))
        assert r.status_code == 403, (method, path)
        assert "needs an admin key" in r.json()["error"]["message"]
    assert gw.client.get("/api/local-engine/status", headers=bearer(alice)).status_code == 200
    # a user key sees only the models it may use: in /v1/models, a model card, /api/gateway and an error's list
    listed = {m["id"] for m in gw.client.get("/v1/models", headers=bearer(alice)).json()["data"]}
    assert listed == {MODEL_A}
    assert {MODEL_A, MODEL_B} <= {m["id"] for m in gw.client.get("/v1/models", headers=bearer(bob)).json()["data"]}
    assert gw.client.get(f"/v1/models/{MODEL_B}", headers=bearer(alice)).status_code == 404
    assert gw.client.get(f"/v1/models/{MODEL_B}", headers=bearer(bob)).status_code == 200
    assert {m["id"] for m in gw.client.get("/api/gateway", headers=bearer(alice)).json()["models"]} == {MODEL_A}
    r = gw.client.get("/v1/models/org/Nothing", headers=bearer(alice))
    assert r.status_code == 404
    assert MODEL_A in r.text
    assert MODEL_B not in r.text
    _, carol = keys.add("carol", "user", [MODEL_A, "org/Nothing*"])
    r = gw.post("/v1/chat/completions", {"model": "org/Nothing-1", "messages": [{"role": "user", "content": "x"}]},
                headers=bearer(carol))
    assert r.status_code == 404, r.text
    assert MODEL_A in r.json()["error"]["message"]
    assert MODEL_B not in r.json()["error"]["message"]

    r = gw.post("/api/local-engine/stop", {"model": MODEL_A}, headers=bearer(bob))
    assert r.status_code == 200, r.text
    audit = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
    stops = [e for e in audit if e["command"] == "stop"]
    assert stops
    assert stops[-1]["key"] == "bob"
    starts = [e for e in audit if e["command"] == "start"]
    assert starts
    assert starts[0]["key"] == "alice"

    keys.remove("alice")
    assert gw.chat(MODEL_A, headers=bearer(alice)).status_code == 401


def test_a_corrupt_or_newer_key_file_keeps_the_last_good_keys(gateway, home: Path) -> None:
    from sage_llm.gateway import keys

    _, alice = keys.add("alice")
    gw = gateway()
    assert gw.client.get("/v1/models", headers=bearer(alice)).status_code == 200
    path = keys.path()
    good = path.read_text()
    path.write_text(good[: len(good) // 2])
    assert gw.client.get("/v1/models", headers=bearer(alice)).status_code == 200
    info = gw.client.get("/api/gateway", headers=bearer(alice)).json()["access"]
    assert "not valid JSON" in info["error"]
    assert "last good keys" in info["error"]
    assert gw.client.get("/v1/models").status_code == 401  # still keyed
    doc = json.loads(good)
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    assert gw.client.get("/v1/models", headers=bearer(alice)).status_code == 200
    assert "newer" in gw.client.get("/api/gateway", headers=bearer(alice)).json()["access"]["error"]
    path.write_text(good)
    assert gw.client.get("/api/gateway", headers=bearer(alice)).json()["access"]["error"] is None


def test_a_key_removed_while_it_streams_finishes_that_stream(gateway, home: Path, monkeypatch) -> None:
    from sage_llm.gateway import keys

    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY_S", "0.05")
    monkeypatch.setenv("FAKE_VLLM_REPLY", " ".join(f"w{i}" for i in range(20)))
    _, alice = keys.add("alice")
    gw = gateway()
    body = {"model": MODEL_A, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with gw.client.stream("POST", "/v1/chat/completions", json=body, headers=bearer(alice)) as r:
        assert r.status_code == 200
        it = r.iter_bytes()
        first = next(it)
        keys.remove("alice")
        assert gw.client.get("/v1/models", headers=bearer(alice)).status_code == 401  # the next one: refused
        text = (first + b"".join(it)).decode()
    assert text.rstrip().endswith("data: [DONE]")
    events = sse_events(text)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]).split() == \
        [f"w{i}" for i in range(20)]
    assert all("usage" not in e for e in events)  # the usage chunk the gateway asked for is not shown


def test_usage_totals_equal_the_engines_usage_over_1000_requests(gateway, home: Path, cli) -> None:
    from sage_llm.gateway import keys, usage

    _, alice = keys.add("alice")
    _, bob = keys.add("bob", "admin")
    gw = gateway()
    assert gw.chat(MODEL_A, headers=bearer(bob)).status_code == 200  # loads the engine

    def one(i: int) -> None:
        who = alice if i % 2 else bob
        stream = i % 3 != 0
        extra: dict = {"max_tokens": 1 + i % 7}
        asked = stream and i % 5 == 0
        if asked:
            extra["stream_options"] = {"include_usage": True}
        content = " ".join(["word"] * (i % 11))
        r = client.post("/v1/chat/completions", headers=bearer(who),
                        json={"model": MODEL_A, "stream": stream, **extra,
                              "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        if stream:
            got = [e for e in sse_events(r.text) if e.get("usage")]
            assert len(got) == (1 if asked else 0)  # shown when asked for, dropped when the gateway added it
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1

    with httpx.Client(base_url=gw.url, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(1000)))
    engine = gw.gw.router.engines[0]
    metrics = httpx.get(f"{engine.base_url}/metrics", timeout=10).text

    def counter(name: str) -> int:
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith(name + "{")))

    rows = usage.summarize(by="model")
    assert len(rows) == 1
    assert rows[0].requests == 1001
    assert rows[0].errors == 0
    assert rows[0].prompt_tokens == counter("vllm:prompt_tokens_total")
    assert rows[0].completion_tokens == counter("vllm:generation_tokens_total")
    by_key = {r.key: r for r in usage.summarize(by="key")}
    assert by_key["alice"].requests == 500
    assert by_key["bob"].requests == 501
    prom = gw.client.get("/metrics", headers=bearer(bob)).text
    assert f'sage_llm_gateway_key_requests_total{{key="alice",model="{MODEL_A}"}} 500' in prom
    assert alice not in prom
    assert bob not in prom
    code, out, _ = cli("gateway", "usage", "--since", "1d", "--by", "key", "--json")
    assert code == 0
    assert {r["key"]: r["requests"] for r in json.loads(out)} == {"alice": 500, "bob": 501}


def test_per_key_limits_answer_429_naming_the_limit(gateway, home: Path, monkeypatch) -> None:
    from sage_llm.gateway import keys

    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY_S", "0.05")
    _, one = keys.add("one-at-a-time", max_concurrency=1)
    _, tpm = keys.add("thrifty", tokens_per_minute=5)
    gw = gateway()
    body = {"model": MODEL_A, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with gw.client.stream("POST", "/v1/chat/completions", json=body, headers=bearer(one)) as r:
        it = r.iter_bytes()
        next(it)
        second = gw.chat(MODEL_A, headers=bearer(one))
        assert b"".join(it).rstrip().endswith(b"[DONE]")
    assert second.status_code == 429
    assert second.headers["Retry-After"] == "1"
    err = second.json()["error"]
    assert err["code"] == "rate_limit_exceeded"
    assert "max_concurrency limit is 1" in err["message"]
    assert gw.chat(MODEL_A, headers=bearer(one)).status_code == 200  # the slot is free again

    assert gw.chat(MODEL_A, headers=bearer(tpm)).status_code == 200  # spends more than 5 tokens
    over = gw.chat(MODEL_A, headers=bearer(tpm))
    assert over.status_code == 429
    assert "tokens_per_minute limit is 5" in over.json()["error"]["message"]
    assert 1 <= int(over.headers["Retry-After"]) <= 61
