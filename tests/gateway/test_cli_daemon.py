"""`sage llm gateway start | status | stop` (detached, recorded like an engine), `status --json` showing it, and
--upstream static routes (how benchmarks put the gateway in front of any OpenAI-compatible server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port
from tests.gateway.conftest import MODEL_A


def test_start_status_stop_detached(cli, fake_vllm, hub, home, stop_all) -> None:
    port = free_port()
    code, out, err = cli("gateway", "start", "--port", str(port), "--engine-port", str(free_port()),
                         "--no-external", "--json")
    assert code == 0, err
    started = json.loads(out)
    assert started["port"] == port
    record = home / "gateway.json"
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    try:
        code, out, _ = cli("gateway", "status", "--json")
        st = json.loads(out)
        assert code == 0
        assert st["running"] is True
        assert st["healthy"] is True
        # a second gateway on top: refused, nothing changed
        code, _out, err = cli("gateway", "start", "--port", str(free_port()))
        assert code == 2
        assert "already runs" in err
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": MODEL_A, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        engine = r.headers["x-sage-llm-engine"]
        code, out, _ = cli("status", "--json")
        doc = json.loads(out)
        assert doc["gateway"]["running"] is True
        assert doc["gateway"]["pid"] == started["pid"]
        assert any(e["name"] == engine for e in doc["engines"])
        code, _out, err = cli("status")
        assert f"gateway: http://127.0.0.1:{port}/v1 (pid {started['pid']})" in err
    finally:
        code, out, err = cli("gateway", "stop")
    assert code == 0, err
    assert "stopped the gateway" in out
    assert not record.exists()
    # the gateway stopped the engine it started
    assert not (home / "engines" / f"{engine}.json").exists()
    code, out, _ = cli("gateway", "status")
    assert code == 3


def test_upstream_static_route_relays_a_stream(gateway) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakes" / "fast_sse.py"), str(port),
                             "--tokens", "16"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        gw = gateway(upstreams=[f"bench=http://127.0.0.1:{port}/v1"])
        ids = [c["id"] for c in gw.client.get("/v1/models").json()["data"]]
        assert "bench" in ids
        with gw.client.stream("POST", "/v1/chat/completions", json={"model": "bench", "stream": True,
                                                                     "messages": [{"role": "user", "content": "x"}]}
                              ) as s:
            assert s.headers["x-sage-llm-engine"] == "bench"
            body = "".join(s.iter_text())
        assert body.count('"content":"t') == 16
        assert body.rstrip().endswith("[DONE]")
    finally:
        proc.terminate()
        proc.wait(10)


def test_gateway_module_refuses_bad_argv() -> None:
    r = subprocess.run([sys.executable, "-m", "sage_llm.gateway", "--bogus"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(Path(ROOT) / "src")})
    assert r.returncode == 2
    assert "usage" in r.stderr


def test_gateway_run_prints_engine_events(fake_vllm, hub, home, stop_all) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sage_llm = str(Path(sys.executable).parent / "sage-llm")
    proc = subprocess.Popen([sage_llm, "gateway", "run", "--port", str(port),
                             "--engine-port", str(free_port()), "--no-external"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": MODEL_A, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    finally:
        proc.send_signal(2)  # Ctrl-C: stops the gateway and the engine it started
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"loading {MODEL_A}" in err
    assert f"{MODEL_A} ready in" in err
    assert "stopped engine 'tiny-chat'" in err
    assert not (home / "engines" / "tiny-chat.json").exists()


def test_the_detached_gateways_command_line_says_sage_llm_gateway(cli, fake_vllm, hub, home) -> None:
    """Tools find the local gateway by its command line (SAGE Studio's `sage studio stop --stop-llm` looks for
    `sage-llm gateway`; the published Studio itself runs in tests/e2e/test_sage_published.py)."""
    import psutil

    code, out, err = cli("gateway", "start", "--port", str(free_port()), "--engine-port", str(free_port()),
                         "--no-external", "--json")
    assert code == 0, err
    try:
        assert "sage-llm gateway" in " ".join(psutil.Process(json.loads(out)["pid"]).cmdline())
    finally:
        assert cli("gateway", "stop")[0] == 0
