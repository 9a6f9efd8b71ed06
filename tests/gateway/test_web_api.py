"""The management routes the web panel uses (and Studio can use): engines, monitor, logs, models, pull, remove.
Plain HTTP against a real gateway with fake engines; no browser needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sage_llm.observe import gpu
from sage_llm.observe.progress import LABELS
from tests.fakes.fake_hub import FakeHub, Repo
from tests.fakes.fake_nvml import FakeGpu, FakeNVML, FakeProc, GiB
from tests.gateway.conftest import MODEL_A, MODEL_B

pytestmark = pytest.mark.timeout(120)


def start(gw, model: str = MODEL_A) -> dict:
    r = gw.post("/api/local-engine/start?wait=1", {"model": model})
    assert r.status_code == 200, r.text
    return next(e for e in gw.client.get("/api/engines").json()["engines"] if e["model"] == model)


def test_stages_are_starts_labels_in_order(gateway) -> None:
    gw = gateway()
    doc = gw.client.get("/api/stages").json()
    assert [(s["name"], s["label"]) for s in doc["stages"]] == list(LABELS.items())


def test_engines_view_and_monitor_frame(gateway) -> None:
    nv = FakeNVML([FakeGpu(total=80 * GiB, used=3 * GiB, util=55)])
    gpu.set_backend(nv)
    try:
        gw = gateway()
        assert gw.client.get("/api/engines").json()["engines"] == []
        e = start(gw)
        nv.processes[0] = [FakeProc(e["pid"], 5 * GiB)]
        assert e["state"] == "ready"
        assert e["managed_by_gateway"] is True
        assert e["external"] is False
        assert e["uptime_s"] is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the refresh loop attaches the engine's GPU memory
            e = next(x for x in gw.client.get("/api/engines").json()["engines"] if x["model"] == MODEL_A)
            if e["gpu_memory_usage"] == 5.0:
                break
            time.sleep(0.1)
        assert e["gpu_memory_usage"] == 5.0
        gw.chat(MODEL_A, stream=True)
        frame = gw.client.get("/api/monitor").json()
        assert frame["gpus"][0]["utilization_percent"] == 55
        assert frame["gpus"][0]["memory_used_bytes"] == 3 * GiB
        row = next(r for r in frame["engines"] if r["name"] == e["name"])
        assert row["model"] == MODEL_A
        assert row["running"] == 0
        assert row["kv_cache_usage"] == 0
        assert row["metrics_error"] is None
        time.sleep(1.0)
        gw.chat(MODEL_A, stream=True)
        frame2 = gw.client.get("/api/monitor").json()
        row2 = next(r for r in frame2["engines"] if r["name"] == e["name"])
        assert row2["generation_tps"] is not None
        assert row2["generation_tps"] > 0  # a rate over two scrapes, as `top` computes it
        assert len(frame2["gpus"][0]["memory_history"]) >= 2
    finally:
        gpu.reset()


def test_log_tail_and_follow_until_the_engine_stops(gateway) -> None:
    gw = gateway()
    e = start(gw)
    r = gw.client.get(f"/api/engines/{e['name']}/logs", params={"n": 500})
    assert r.status_code == 200
    assert any("Starting vLLM server" in line for line in r.json()["lines"])
    assert gw.client.get(f"/api/engines/{e['name']}/logs", params={"n": "x"}).status_code == 400
    missing = gw.client.get("/api/engines/nobody/logs")
    assert missing.status_code == 404
    assert "nobody" in missing.json()["error"]["message"]

    got: list[tuple[str, str]] = []
    with httpx.Client(base_url=gw.url, timeout=30) as c, \
            c.stream("GET", f"/api/engines/{e['name']}/logs", params={"follow": 1, "n": 3}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        kind = None
        asked = stopped = False
        for line in s.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                got.append((kind, json.loads(line[6:])["text"]))
                if len(got) == 3 and not asked:  # the tail came; now a request appears in the log as it happens
                    asked = True
                    gw.chat(MODEL_A)
                if any("POST /v1/chat/completions" in t for _k, t in got) and not stopped:
                    stopped = True
                    assert gw.post("/api/local-engine/stop", {"name": e["name"]}).status_code == 200
                if kind == "end":
                    break
    assert [k for k, _t in got[:3]] == ["line", "line", "line"]
    assert got[-1][0] == "end"
    assert "stopped" in got[-1][1] or "exited" in got[-1][1]


def test_models_list_remove_refused_while_served(gateway, hub: Path) -> None:
    gw = gateway()
    doc = gw.client.get("/api/models").json()
    ids = [m["repo_id"] for m in doc["models"]]
    assert ids == [MODEL_A, MODEL_B]
    assert all(m["size_on_disk"] > 0 for m in doc["models"])
    assert any(r["repo_id"] == "Qwen/Qwen2.5-7B-Instruct" and r["fit"] for r in doc["recommended"])
    e = start(gw)
    doc = gw.client.get("/api/models").json()
    assert next(m for m in doc["models"] if m["repo_id"] == MODEL_A)["engines"] == [e["name"]]
    r = gw.post("/api/models/remove", {"model": MODEL_A})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "model_in_use"
    assert (hub / "models--org--Tiny-Chat").is_dir()
    assert gw.post("/api/models/remove", {"model": "org/absent"}).status_code == 404
    assert gw.post("/api/models/remove", {"model": "no-slash"}).status_code == 400
    assert gw.post("/api/models/remove", {"model": MODEL_B, "force": True}).status_code == 400
    r = gw.post("/api/models/remove", {"model": MODEL_B})
    assert r.status_code == 200
    assert r.json()["freed_bytes"] > 0
    assert not (hub / "models--org--Tiny-Other").exists()
    # state changes follow the gateway's rules: JSON only, no foreign origin
    r = gw.client.post("/api/models/remove", content=json.dumps({"model": MODEL_A}),
                       headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = gw.post("/api/models/remove", {"model": MODEL_A}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


def test_pull_reports_progress_on_the_event_stream(gateway, monkeypatch) -> None:
    hub = FakeHub(repos={"org/remote": Repo({"config.json": json.dumps({"model_type": "llama",
                                                                        "architectures": ["LlamaForCausalLM"],
                                                                        "quantization_config": {"quant_method": "awq"}
                                                                        }).encode(),
                                             "model.safetensors": b"w" * 4_000_000})}).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        gw = gateway()
        assert gw.post("/api/models/pull", {"model": "bad id"}).status_code == 400
        assert gw.post("/api/models/pull", {"model": "org/remote", "x": 1}).status_code == 400
        events = []
        with httpx.Client(base_url=gw.url, timeout=30) as c, c.stream("GET", "/api/events") as s:
            r = gw.post("/api/models/pull", {"model": "org/remote"})
            assert r.status_code == 202
            assert r.json()["state"] == "downloading"
            for line in s.iter_lines():
                if line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if ev["event"] == "pull":
                        events.append(ev)
                        if ev["state"] != "downloading":
                            break
        assert events[-1]["state"] == "done", events[-1]
        assert events[-1]["bytes"] >= 4_000_000
        doc = gw.client.get("/api/models").json()
        m = next(m for m in doc["models"] if m["repo_id"] == "org/remote")
        assert m["quantization"] == "awq"  # detected from the model's config, as the start form shows it
        assert doc["pulls"][0]["state"] == "done"
        # a pull the hub refuses ends in `failed` with the library's message
        r = gw.post("/api/models/pull", {"model": "org/missing"})
        assert r.status_code == 202
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            p = next(p for p in gw.client.get("/api/models").json()["pulls"] if p["model"] == "org/missing")
            if p["state"] != "downloading":
                break
            time.sleep(0.1)
        assert p["state"] == "failed"
        assert "org/missing" in p["error"]
    finally:
        hub.stop()


def test_browser_tests_skip_outside_ci_and_fail_in_ci(tmp_path: Path) -> None:
    """Without Chromium the browser tier says why and skips; with CI set the same run fails."""
    env = {**os.environ, "SAGE_LLM_CHROMIUM": str(tmp_path / "no-chromium")}
    env.pop("CI", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "tests/gateway/test_web_panel.py::test_auto_source_falls_back_to_the_cloud"]
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout
    assert "browser tests skipped: Chromium is absent" in out.stdout
    out = subprocess.run(cmd, env={**env, "CI": "1"}, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout
    assert "browser tests must run in CI: Chromium is absent" in out.stdout


def test_a_followed_log_ends_when_the_gateway_stops(gateway, stop_all) -> None:
    import threading

    gw = gateway(keep_engines=True)  # the engine lives on: only the gateway's stop can end the stream
    e = start(gw)
    got: list[str] = []
    opened = threading.Event()

    def follow() -> None:
        with httpx.Client(base_url=gw.url, timeout=60) as c, \
                c.stream("GET", f"/api/engines/{e['name']}/logs", params={"follow": 1, "n": 1}) as s:
            for line in s.iter_lines():
                opened.set()
                if line.startswith("event: "):
                    got.append(line[7:])

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert opened.wait(10)
    t0 = time.monotonic()
    gw.stop()
    took = time.monotonic() - t0
    t.join(10)
    assert not t.is_alive()
    assert got[-1] == "end"
    assert took < 20, took  # not held up by the open stream (aiohttp's shutdown waits 60 s for handlers)
