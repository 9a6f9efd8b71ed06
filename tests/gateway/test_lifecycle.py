"""Priority 3, 5, 7, 8: idle TTL, --max-engines with LRU eviction, pinned models, sleep mode, the management API and
its events, /metrics, crashes mid-stream, client disconnects, adoption after a gateway restart."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from sage_llm.core.state import EngineRecord, StateStore
from tests.gateway.conftest import MODEL_A, MODEL_B, engine_starts, sse_events


def wait_for(pred, timeout: float = 20.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("condition not met in time")


def card(gw, model: str) -> dict:
    return {c["id"]: c for c in gw.client.get("/v1/models").json()["data"]}[model]


def live_engines() -> list[str]:
    from sage_llm.engine import inspect as engine_inspect

    views, _ = engine_inspect.inspect(include_external=False)
    return [v.name for v in views if v.state in ("ready", "starting")]


def write_config(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config" / "llm.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_idle_ttl_stops_the_engine_and_a_new_request_loads_it_again(gateway, home) -> None:
    gw = gateway(ttl="1s")
    engine = gw.chat(MODEL_A).headers["x-sage-llm-engine"]
    wait_for(lambda: card(gw, MODEL_A)["state"] == "available")
    assert StateStore().load(engine) is None  # stopped through `stop`: record gone, nothing left
    assert live_engines() == []
    assert gw.chat(MODEL_A).status_code == 200
    assert engine_starts(home) == 2


def test_pinned_model_is_never_unloaded(gateway, tmp_path) -> None:
    write_config(tmp_path, f'[gateway.models."{MODEL_A}"]\npinned = true\naliases = ["tiny"]\n')
    gw = gateway(ttl="0.5s", max_engines=1)
    r = gw.chat("tiny")  # an alias
    assert r.status_code == 200
    time.sleep(1.5)
    assert card(gw, MODEL_A)["state"] == "ready"
    # the only slot is pinned: another model cannot make room -> 503 naming what holds it
    other = gw.chat(MODEL_B)
    assert other.status_code == 503
    assert "max-engines 1" in other.json()["error"]["message"]
    assert MODEL_A in other.json()["error"]["message"]
    assert "Retry-After" in other.headers


def test_max_engines_evicts_the_least_recently_used_idle_engine(gateway, home) -> None:
    gw = gateway(max_engines=1, ttl="0")
    a = gw.chat(MODEL_A).headers["x-sage-llm-engine"]
    b = gw.chat(MODEL_B)
    assert b.status_code == 200
    assert StateStore().load(a) is None
    assert live_engines() == [b.headers["x-sage-llm-engine"]]
    assert card(gw, MODEL_A)["state"] == "available"
    metrics = gw.client.get("/metrics").text
    assert f'sage_llm_gateway_engine_unloads_total{{model="{MODEL_A}",reason="evicted"}} 1' in metrics
    assert "sage_llm_gateway_swaps_total 1" in metrics


def held(tmp_path: Path, gate: str) -> list[Path]:
    """The requests the fake engines hold at FAKE_VLLM_REPLY_GATE=tmp_path/gate (in flight, not answered)."""
    return list(tmp_path.glob(f"{gate}.held-*"))


def test_an_engine_serving_a_request_is_not_evicted(gateway, tmp_path, monkeypatch) -> None:
    gate = tmp_path / "reply-gate"
    monkeypatch.setenv("FAKE_VLLM_REPLY_GATE", str(gate))
    gw = gateway(max_engines=1, ttl="0")
    a = gw.post("/api/local-engine/start?wait=1", {"model": MODEL_A}).json()["engine"]
    results: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: results.setdefault("a", gw.chat(MODEL_A)))
    t.start()
    wait_for(lambda: held(tmp_path, "reply-gate"))  # A is mid-request: its engine holds the request
    b = gw.chat(MODEL_B)
    assert b.status_code == 503, b.text  # never 200 while A serves: that would be two engines
    assert f"{MODEL_A} (1 in flight)" in b.json()["error"]["message"]
    assert "Retry-After" in b.headers
    assert live_engines() == [a]
    gate.touch()
    t.join(30)
    assert results["a"].status_code == 200  # not cut off
    b = gw.chat(MODEL_B)  # A is idle now: evicted
    assert b.status_code == 200
    assert live_engines() == [b.headers["x-sage-llm-engine"]]
    assert "sage_llm_gateway_swaps_total 1" in gw.client.get("/metrics").text


def listen(gw, events: list[dict]) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", f"{gw.url}/api/events", timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for(lambda: gw.gw.bus.subscribers)
    return t


def test_max_engines_holds_the_room_of_a_loading_engine(gateway, home, tmp_path, monkeypatch) -> None:
    """Issue 21 defect 1: with --max-engines 1, B asked for while A was loading got a second engine (swaps_total 0).
    A load holds its room from the moment it is decided; B evicts A once A is up (it is idle: no request of its
    own), and B's engine is launched only after A's is stopped."""
    gate = tmp_path / "load-gate"
    monkeypatch.setenv("FAKE_VLLM_LOAD_GATE", str(gate))
    gw = gateway(max_engines=1, ttl="0")
    events: list[dict] = []
    listen(gw, events)
    assert gw.post("/api/local-engine/start", {"model": MODEL_A}).status_code == 202
    wait_for(lambda: StateStore().names())  # A's engine is launched (held by the gate)
    results: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: results.setdefault("b", gw.chat(MODEL_B)))
    t.start()
    wait_for(lambda: card(gw, MODEL_B)["state"] == "loading")
    assert engine_starts(home) == 1  # B waits for room: nothing launched for it
    assert len(StateStore().names()) == 1
    gate.touch()
    t.join(60)
    assert results["b"].status_code == 200, results["b"].text
    assert engine_starts(home) == 2
    assert live_engines() == [results["b"].headers["x-sage-llm-engine"]]
    metrics = gw.client.get("/metrics").text
    assert "sage_llm_gateway_swaps_total 1" in metrics
    assert f'sage_llm_gateway_engine_unloads_total{{model="{MODEL_A}",reason="evicted"}} 1' in metrics
    wait_for(lambda: any(e["event"] == "ready" and e.get("model") == MODEL_B for e in events))
    order = [(e["event"], e.get("model"), e.get("stage")) for e in events]
    a_stopped = order.index(("stopped", MODEL_A, None))
    b_launched = order.index(("loading", MODEL_B, "launching"))
    assert a_stopped < b_launched, order


def test_start_answers_202_loading(gateway, tmp_path, monkeypatch) -> None:
    """Issue 21 defect 11: the 202 of POST /api/local-engine/start said "available" where the docs promise
    "loading"."""
    monkeypatch.setenv("FAKE_VLLM_LOAD_GATE", str(tmp_path / "gate"))
    gw = gateway()
    r = gw.post("/api/local-engine/start", {"model": MODEL_A})
    assert r.status_code == 202
    assert r.json()["state"] == "loading"
    assert card(gw, MODEL_A)["state"] == "loading"
    (tmp_path / "gate").touch()
    wait_for(lambda: card(gw, MODEL_A)["state"] == "ready")


def test_a_stop_from_outside_is_a_stop_not_a_crash(gateway, home) -> None:
    """Issue 21 defect 4: `sage-llm stop ENGINE` twice locked the model out ("died 2 times", 503), or the next
    request went to the stopped engine (502). The refresh loop is made slow here: the gateway must notice the stop
    by itself before it routes the next request."""
    from sage_llm import api

    gw = gateway(refresh_s=3600)
    seen = []
    for _ in range(3):
        r = gw.chat(MODEL_A)
        assert r.status_code == 200, r.text
        engine = r.headers["x-sage-llm-engine"]
        pid = StateStore().load(engine).pid
        assert pid not in seen  # a fresh engine each time, never the stopped one
        seen.append(pid)
        assert api.stop(engine).stopped  # what `sage-llm stop ENGINE` does
    r = gw.chat(MODEL_A)
    assert r.status_code == 200, r.text
    assert card(gw, MODEL_A)["error"] is None
    assert engine_starts(home) == 4


def test_a_stop_from_outside_during_a_request_is_not_a_crash(gateway, home, tmp_path, monkeypatch) -> None:
    from sage_llm import api

    gw = gateway(refresh_s=3600)
    for i in range(2):
        monkeypatch.setenv("FAKE_VLLM_REPLY_GATE", str(tmp_path / f"gate{i}"))  # held, never released
        answers: list[object] = []

        def ask(answers: list[object] = answers) -> None:
            try:
                answers.append(gw.chat(MODEL_A).status_code)
            except httpx.HTTPError as exc:
                answers.append(exc)
        t = threading.Thread(target=ask)
        t.start()
        wait_for(lambda i=i: held(tmp_path, f"gate{i}"))
        [engine] = StateStore().names()
        assert api.stop(engine).stopped
        t.join(30)
        assert answers
        assert answers[0] != 200
    monkeypatch.delenv("FAKE_VLLM_REPLY_GATE")
    r = gw.chat(MODEL_A)
    assert r.status_code == 200, r.text  # not "died 2 times"
    assert card(gw, MODEL_A)["state"] == "ready"


def test_a_stop_while_loading_cancels_the_load(gateway, home, tmp_path, monkeypatch) -> None:
    """Issue 21 defect 5: the stop waited for the load (up to the load timeout), said "stopped", and the queued
    request started the model again. Now the stop cancels the load and the waiting request fails at once."""
    monkeypatch.setenv("FAKE_VLLM_LOAD_GATE", str(tmp_path / "never"))  # the load would never end by itself
    gw = gateway()
    answers: list[httpx.Response] = []
    t = threading.Thread(target=lambda: answers.append(gw.chat(MODEL_A)))
    t.start()
    wait_for(lambda: StateStore().names())  # launched and recorded
    stop = gw.client.post("/api/local-engine/stop", json={"model": MODEL_A}, timeout=20)
    assert stop.status_code == 200, stop.text
    assert "cancelled" in stop.json()["message"]
    t.join(20)
    assert answers[0].status_code == 503
    assert answers[0].json()["error"]["code"] == "load_cancelled"
    assert StateStore().names() == []
    assert live_engines() == []
    assert card(gw, MODEL_A)["state"] == "available"
    assert engine_starts(home) == 1  # nothing started it again


@pytest.mark.parametrize("port_of", ["gateway", "in_use", "out_of_range", "privileged"])
def test_a_bad_port_to_start_is_a_400_and_holds_nothing(gateway, home, port_of) -> None:
    """Issue 21 defect 6: the gateway's own port gave 503 model_load_failed and held the model failed for 60 s."""
    import socket

    gw = gateway()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = {"gateway": gw.gw.opts.port, "in_use": busy.getsockname()[1], "out_of_range": 70000,
                "privileged": 80}[port_of]
        r = gw.post("/api/local-engine/start", {"model": MODEL_A, "port": port})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "port"
        assert str(port) in r.json()["error"]["message"]
        assert card(gw, MODEL_A)["state"] == "available"
        assert engine_starts(home) == 0
        assert gw.chat(MODEL_A).status_code == 200  # nothing held
    finally:
        busy.close()


def test_only_cached_or_configured_models_are_loadable(gateway, home, tmp_path) -> None:
    """Issue 21 defect 8: start accepted "auto", any directory with a config.json and uncached ids, which then stayed
    loadable and a chat request started an engine (a hub download with real vLLM)."""
    from tests.cli.test_models_cli import LLAMA

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA))
    gw = gateway(fallback=False)
    for name in ("auto", str(folder), "org/not-cached"):
        r = gw.post("/api/local-engine/start", {"model": name})
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["param"] == "model"
        assert "pull it first" in r.json()["error"]["message"] or "virtual" in r.json()["error"]["message"]
        assert name not in {c["id"] for c in gw.client.get("/v1/models").json()["data"]}
        assert gw.chat(name).status_code != 200
    assert engine_starts(home) == 0
    # a local directory is served through a configured profile
    gw.stop()
    write_config(tmp_path, f'[gateway.models."{folder}"]\naliases = ["mine"]\n')
    gw = gateway(fallback=False)
    r = gw.chat("mine")
    assert r.status_code == 200, r.text


def test_a_second_gateway_on_the_same_state_directory_refuses_to_start(home, fake_vllm) -> None:
    """Two real gateway processes on one state directory: the second exits 2 naming the first's pid and port."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    p1, p2 = free_port(), free_port()
    cmd = [sys.executable, "-m", "sage_llm", "gateway", "run", "--no-external", "--port"]
    first = subprocess.Popen([*cmd, str(p1)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        wait_for(lambda: first.poll() is not None or _listening(p1), timeout=60)
        assert first.poll() is None
        second = subprocess.run([*cmd, str(p2)], capture_output=True, text=True, timeout=60, env=dict(os.environ))
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert f"port {p1}" in second.stderr
        assert "Traceback" not in second.stderr
        assert not _listening(p2)
    finally:
        first.terminate()
        first.wait(60)
    third = subprocess.Popen([*cmd, str(p2)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=dict(os.environ))
    try:  # the lock went with the first gateway
        wait_for(lambda: third.poll() is not None or _listening(p2), timeout=60)
        assert third.poll() is None
    finally:
        third.terminate()
        third.wait(60)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_external_engine_of_another_user_gets_no_traffic(gateway, monkeypatch) -> None:
    """Audit (issue 21): another local user's fake vLLM on a port received a model's traffic. Only processes of the
    gateway's own uid are trusted as external engines (here the gateway is made to believe it runs as another uid,
    so the engine it finds looks like someone else's)."""
    import os
    import subprocess
    import sys

    from tests.conftest import FAKE_VLLM, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE_VLLM), "serve", "other/user-model", "--port", str(port)],
                            env=dict(os.environ, FAKE_VLLM_LOAD_S="0"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port))
        monkeypatch.setattr("sage_llm.gateway.engines.OWN_UID", os.getuid() + 4242)
        gw = gateway(external=True, fallback=False)
        gw.call(gw.gw.router.refresh)
        assert "other/user-model" not in {c["id"] for c in gw.client.get("/v1/models").json()["data"]}
        assert gw.chat("other/user-model").status_code == 404
        monkeypatch.setattr("sage_llm.gateway.engines.OWN_UID", os.getuid())  # our own: trusted
        gw.call(gw.gw.router.refresh)
        assert gw.chat("other/user-model").status_code == 200
    finally:
        proc.terminate()
        proc.wait()


def test_management_api(gateway, home) -> None:
    gw = gateway()
    st = gw.client.get("/api/local-engine/status").json()
    assert set(st) == {"running", "port", "model", "pid", "gpu_memory_usage", "uptime"}
    assert st["running"] is False
    bad = gw.post("/api/local-engine/start", {"model": MODEL_A, "gpu_memory_utilization": 1.5})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "gpu_memory_utilization"
    assert gw.post("/api/local-engine/start", {"model": MODEL_A, "quantization": "nope"}).status_code == 400
    assert gw.post("/api/local-engine/start", {}).status_code == 400
    bad_name = gw.post("/api/local-engine/start", {"model": "not a/model/id"})
    assert bad_name.status_code == 400
    assert "pull it first" in bad_name.json()["error"]["message"]
    assert "not a/model/id" not in {c["id"] for c in gw.client.get("/v1/models").json()["data"]}
    assert engine_starts(home) == 0
    r = gw.post("/api/local-engine/start?wait=1", {"model": MODEL_A, "gpu_memory_utilization": 0.5})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "ready"
    rec = StateStore().load(r.json()["engine"])
    assert isinstance(rec, EngineRecord)
    assert rec.settings["gpu_memory_utilization"] == 0.5
    wait_for(lambda: gw.client.get("/api/local-engine/status").json()["running"])
    st = gw.client.get("/api/local-engine/status").json()
    assert st["model"] == MODEL_A
    assert st["pid"] == rec.pid
    models = gw.client.get("/api/local-engine/models").json()["models"]
    assert {m["id"] for m in models} >= {MODEL_A, MODEL_B}
    assert next(m for m in models if m["id"] == MODEL_B)["cached"] is True
    full = gw.client.get("/api/status").json()
    assert full["schema_version"] == 1
    assert any(e["name"] == rec.name for e in full["engines"])
    assert full["gateway"]["port"] == gw.gw.opts.port
    llm = gw.client.get("/api/llm/status").json()  # what Studio's frontend polls
    assert llm["healthy"] is True
    assert llm["model_name"] == MODEL_A
    assert llm["base_url"] == f"http://127.0.0.1:{gw.gw.opts.port}/v1"
    assert set(llm["available_models"]) >= {MODEL_A, MODEL_B}
    stop = gw.post("/api/local-engine/stop", {"model": MODEL_A})
    assert stop.status_code == 200
    assert stop.json()["stopped"] is True
    assert StateStore().load(rec.name) is None


def test_events_stream_shows_loading_stages_ready_and_stopped(gateway) -> None:
    gw = gateway()
    events: list[dict] = []
    done = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{gw.url}/api/events", timeout=30) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1]["event"] == "stopped":
                        break
        done.set()

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    wait_for(lambda: gw.gw.bus.subscribers)  # subscribed before the load begins
    assert gw.chat(MODEL_A).status_code == 200
    gw.post("/api/local-engine/stop", {"model": MODEL_A})
    assert done.wait(20)
    kinds = [e["event"] for e in events if e.get("model") == MODEL_A]
    assert "loading" in kinds
    assert kinds.index("loading") < kinds.index("ready") < kinds.index("stopped")
    stages = [e.get("stage") for e in events if e["event"] == "loading"]
    assert "loading_weights" in stages or any(s and s != "launching" for s in stages), stages


def test_loading_state_never_enters_the_model_stream(gateway) -> None:
    gw = gateway()
    with gw.client.stream("POST", "/v1/chat/completions", json={"model": MODEL_A, "stream": True, "messages": [
            {"role": "user", "content": "hi"}]}) as s:
        body = "".join(s.iter_text())
    chunks = sse_events(body)
    assert all(c.get("object") == "chat.completion.chunk" for c in chunks)
    assert not any("reasoning_content" in json.dumps(c) for c in chunks)


def test_metrics_count_requests_per_model_and_source(gateway) -> None:
    gw = gateway(fallback=False)
    gw.chat(MODEL_A)
    gw.chat(MODEL_A)
    gw.chat("nobody/x")
    text = gw.client.get("/metrics").text
    assert f'sage_llm_gateway_requests_total{{model="{MODEL_A}",source="local",code="200"}} 2' in text
    assert 'sage_llm_gateway_requests_total{model="other",source="none",code="404"} 1' in text
    assert f'sage_llm_gateway_engine_loads_total{{model="{MODEL_A}",result="ok"}} 1' in text
    assert f'sage_llm_gateway_request_duration_seconds_count{{model="{MODEL_A}",source="local"}} 2' in text


def test_cloud_fallback_and_virtual_models(gateway, monkeypatch) -> None:
    from tests.fakes.fake_openai import FakeOpenAI

    cloud = FakeOpenAI(key="sk-cloud", models=("gpt-test",)).start()
    try:
        monkeypatch.setenv("SAGE_CHAT_BASE_URL", cloud.base_url)
        monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-cloud")
        monkeypatch.setenv("SAGE_CHAT_MODEL", "gpt-test")
        gw = gateway()
        r = gw.chat("cloud")
        assert r.status_code == 200, r.text
        assert r.headers["x-sage-llm-source"] == "cloud"
        assert r.json()["choices"][0]["message"]["content"] == "Hello from the cloud."
        assert cloud.requests[-1]["model"] == "gpt-test"
        # a model the local side does not have goes to the cloud as named
        r = gw.chat("gpt-test")
        assert r.headers["x-sage-llm-source"] == "cloud"
        # auto with nothing local ready and no default model cached -> cloud
        assert gw.chat("auto").headers["x-sage-llm-source"] == "cloud"
        # local model -> local; then auto prefers the ready local engine
        assert gw.chat(MODEL_A).headers["x-sage-llm-source"] == "local"
        r = gw.chat("auto")
        assert r.headers["x-sage-llm-source"] == "local"
        assert r.json()["model"] == MODEL_A
        assert gw.chat("local").headers["x-sage-llm-source"] == "local"
    finally:
        cloud.stop()
    gw.stop()  # one gateway per state directory
    gw2 = gateway(fallback=False)
    assert gw2.chat("gpt-test").status_code == 404


def test_engine_dying_mid_stream_ends_with_an_error_event_and_restarts_once(gateway, home, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY_S", "0.2")
    monkeypatch.setenv("FAKE_VLLM_REPLY", " ".join(["w"] * 40))
    monkeypatch.setenv("FAKE_VLLM_FAIL", "ready:1.5")
    gw = gateway()
    with gw.client.stream("POST", "/v1/chat/completions", json={"model": MODEL_A, "stream": True, "messages": [
            {"role": "user", "content": "hi"}]}) as s:
        body = "".join(s.iter_text())
    errors = [e for e in sse_events(body) if "error" in e]
    assert errors, body[-300:]
    assert errors[-1]["error"]["code"] == "upstream_disconnected"
    wait_for(lambda: card(gw, MODEL_A)["state"] in ("available", "failed"))
    # restarted by the next request (it dies again 1.5 s after ready, but answers first)
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY_S", "0")
    assert gw.chat(MODEL_A).status_code == 200
    assert engine_starts(home) == 2
    # second death: reported, not restarted in a loop
    wait_for(lambda: card(gw, MODEL_A)["state"] == "failed")  # noticed while idle, by the refresh loop
    r = gw.chat(MODEL_A)
    assert r.status_code == 503
    assert "died 2 times" in r.json()["error"]["message"]
    assert engine_starts(home) == 2


def test_client_disconnect_aborts_the_upstream_request(gateway, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY_S", "0.2")
    monkeypatch.setenv("FAKE_VLLM_REPLY", " ".join(["w"] * 100))
    gw = gateway()
    engine = gw.chat(MODEL_A, extra={"max_tokens": 1}).headers["x-sage-llm-engine"]
    rec = StateStore().load(engine)
    with gw.client.stream("POST", "/v1/chat/completions", json={"model": MODEL_A, "stream": True, "messages": [
            {"role": "user", "content": "hi"}]}) as s:
        it = s.iter_bytes()
        next(it)
        next(it)
    # the gateway closed its upstream connection: the engine noticed and stopped generating
    wait_for(lambda: "client disconnected: request aborted" in Path(rec.log_file).read_text(errors="replace"),
             timeout=10)

    def running() -> float:
        key = {"Authorization": f"Bearer {gw.gw.router.find(MODEL_A).engine.api_key}"}
        text = httpx.get(f"http://127.0.0.1:{rec.port}/metrics", headers=key).text
        line = next(ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running"))
        return float(line.rsplit(" ", 1)[1])

    wait_for(lambda: running() == 0.0, timeout=10)
    # issue 21 defect 11: the disconnected client is not counted as answered (499), the first request is
    def metric(code: int) -> str:
        return f'sage_llm_gateway_requests_total{{model="{MODEL_A}",source="local",code="{code}"}} 1'

    wait_for(lambda: metric(499) in gw.client.get("/metrics").text, timeout=10)
    assert metric(200) in gw.client.get("/metrics").text


def test_a_restarted_gateway_adopts_running_engines(gateway, home) -> None:
    gw = gateway(keep_engines=True)
    engine = gw.chat(MODEL_A).headers["x-sage-llm-engine"]
    gw.stop()
    assert StateStore().load(engine) is not None  # left running on purpose (as after a crash)
    gw2 = gateway()
    r = gw2.chat(MODEL_A)
    assert r.status_code == 200
    assert r.headers["x-sage-llm-engine"] == engine  # the same engine: its key recomputed, not a duplicate
    assert engine_starts(home) == 1
    gw2.stop()  # this one stops what it adopted
    assert StateStore().load(engine) is None


def test_sleep_mode_puts_the_lru_engine_to_sleep_and_wakes_it(gateway, home, tmp_path, monkeypatch) -> None:
    log = tmp_path / "sleep.log"
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    monkeypatch.setenv("FAKE_VLLM_SLEEP_LOG", str(log))
    gw = gateway(max_engines=1, ttl="0", sleep=True)
    gw.gw.router.cpu = False  # as on a GPU host (the fake implements the dev routes vLLM has there)
    monkeypatch.setattr("sage_llm.gateway.engines.is_cpu_engine", lambda: False)
    a = gw.chat(MODEL_A).headers["x-sage-llm-engine"]
    rec = StateStore().load(a)
    assert "--enable-sleep-mode" in rec.argv
    # the dev routes are not guarded by the engine key in vLLM: the gateway never exposes them itself
    b = gw.chat(MODEL_B)
    assert b.status_code == 200
    assert card(gw, MODEL_A)["state"] == "sleeping"
    assert StateStore().load(a) is not None  # still running, asleep
    r = gw.chat(MODEL_A)
    assert r.status_code == 200
    assert r.headers["x-sage-llm-engine"] == a
    assert engine_starts(home) == 2  # woken, not restarted
    lines = log.read_text().split()
    assert "/sleep?level=1" in lines
    assert "/wake_up" in lines
    assert "VLLM_SERVER_DEV_MODE" not in __import__("os").environ  # only the engine's environment had it
    assert not [k for k in __import__("os").environ if k.startswith("SAGE_LLM_GW_KEY_")]  # keys not left behind


@pytest.mark.parametrize("toml", ['[gateway.models."a/b"]\ngpu_memory_utilization = 2\n',
                                  '[gateway.models."a/b"]\naliases = ["auto"]\n', '[gateway]\nttl = "soon"\n'])
def test_bad_profiles_are_refused_before_starting(toml, cli, tmp_path) -> None:
    write_config(tmp_path, toml)
    code, _out, err = cli("gateway", "run", "--port", "1")
    assert code == 2
    assert "config file" in err or "--ttl" in err


def test_config_set_keeps_the_gateway_tables(cli, tmp_path) -> None:
    write_config(tmp_path, '[gateway]\nttl = "5m"\n\n[gateway.models."org/Tiny-Chat"]\npinned = true\n'
                           'aliases = ["tiny", "t"]\nargs = ["--max-model-len", "512"]\n')
    code, _out, err = cli("config", "set", "gpu_util", "0.5")
    assert code == 0, err
    from sage_llm.core import settings
    from sage_llm.gateway import options

    cfg = settings.read_config()
    assert cfg["gpu_util"] == 0.5
    profile = options.read_profiles()[MODEL_A]
    assert profile.pinned is True
    assert profile.aliases == ["tiny", "t"]
    assert profile.args == ["--max-model-len", "512"]
    assert options.resolve().ttl == 300.0
    code, _out, err = cli("config", "show")
    assert "unknown setting" not in err


def test_stopping_the_gateway_mid_load_stops_the_loading_engine(gateway, home, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "3")
    gw = gateway()
    answers: list[object] = []

    def ask() -> None:
        try:
            answers.append(gw.chat(MODEL_A).status_code)
        except httpx.HTTPError as exc:  # the gateway went away under the request
            answers.append(exc)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    wait_for(lambda: StateStore().names())
    gw.stop()
    t.join(30)
    assert answers  # answered (an error) rather than left hanging
    assert StateStore().names() == []
    assert live_engines() == []


def test_sleep_mode_stops_instead_when_host_ram_cannot_hold_the_weights(gateway, monkeypatch) -> None:
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    monkeypatch.setattr("sage_llm.gateway.engines.is_cpu_engine", lambda: False)
    monkeypatch.setattr("sage_llm.gateway.engines.host_ram_holds", lambda model: False)
    gw = gateway(max_engines=1, ttl="0", sleep=True)
    gw.gw.router.cpu = False
    a = gw.chat(MODEL_A).headers["x-sage-llm-engine"]
    assert gw.chat(MODEL_B).status_code == 200
    assert card(gw, MODEL_A)["state"] == "available"
    assert StateStore().load(a) is None  # stopped, not asleep


def test_an_open_events_stream_does_not_hold_up_the_shutdown(gateway) -> None:
    gw = gateway()
    got: list[str] = []

    def listen() -> None:
        with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", f"{gw.url}/api/events", timeout=60) as s:
            for line in s.iter_lines():
                got.append(line)

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    wait_for(lambda: gw.gw.bus.subscribers)
    t0 = time.monotonic()
    gw.stop()
    assert time.monotonic() - t0 < 15
    t.join(10)
    assert any('"state": "stopping"' in line for line in got)


def test_an_external_engine_seen_while_loading_is_routed_once_ready(gateway) -> None:
    """The gateway's refresh marks an external vLLM that is still loading as "loading"; it must follow it to ready
    (it stayed "loading" for ever, and requests for it got 503, because refresh skipped every loading slot)."""
    import os
    import subprocess
    import sys

    from tests.conftest import FAKE_VLLM, free_port

    port = free_port()
    gw = gateway(external=True)
    proc = subprocess.Popen([sys.executable, str(FAKE_VLLM), "serve", "hand/loading", "--port", str(port)],
                            env=dict(os.environ, FAKE_VLLM_LOAD_S="3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        states = []
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            cards = {m["id"]: m for m in gw.client.get("/v1/models").json()["data"]}
            card = cards.get("hand/loading")
            if card is not None:
                states.append(card.get("state") or card.get("sage_llm", {}).get("state"))
                if states[-1] == "ready":
                    break
            time.sleep(0.2)
        assert states, "the gateway never listed the external engine"
        assert states[-1] == "ready", states[-5:]
        r = gw.chat("hand/loading")
        assert r.status_code == 200, r.text
        assert r.headers["x-sage-llm-source"] == "local"
    finally:
        proc.terminate()
        proc.wait()
