"""Security checks against a real vLLM (issue 6): loopback-only listeners, the API key nowhere but the engine's
environment, private files."""

from __future__ import annotations

import json
import os
import stat

import httpx
import psutil
import pytest

from sage_llm.core.state import EngineRecord, StateStore

pytestmark = pytest.mark.integration
SECRET = "sk-sage-test-secret-7f3a9c"


def tree_of(rec: EngineRecord) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == rec.pid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def test_loopback_only_key_never_leaks(cli, real_vllm, tiny_model, engine_port, stop_all, monkeypatch, home):
    monkeypatch.setenv("MY_ENGINE_KEY", SECRET)
    port = engine_port()
    code, out, err = cli("start", tiny_model, "--name", "sec", "--port", str(port), "--enforce-eager",
                         "--api-key-env", "MY_ENGINE_KEY", "--timeout", "600")
    assert code == 0, err
    rec = StateStore().load("sec")
    assert isinstance(rec, EngineRecord)
    procs = tree_of(rec)
    assert len(procs) >= 2
    # every listening TCP socket of the engine's whole tree is on loopback
    listening = []
    for p in procs:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                listening.append(c.laddr)
    assert any(a.port == port for a in listening), listening
    assert all(a.ip in ("127.0.0.1", "::1") for a in listening), listening
    # the key: in the engine's environment only
    assert psutil.Process(rec.pid).environ().get("VLLM_API_KEY") == SECRET
    for p in procs:
        assert SECRET not in " ".join(p.cmdline())
    code, status_out, _ = cli("status", "--json")
    texts = {
        "status --json": status_out,
        "record": (home / "engines" / "sec.json").read_text(),
        "engine log": (home / "logs" / "sec.log").read_text(errors="replace"),
        "start output": out + err,
    }
    audit = home / "audit.jsonl"
    if audit.exists():
        texts["audit log"] = audit.read_text()
    for what, text in texts.items():
        assert SECRET not in text, f"the API key leaked into {what}"
    assert json.loads(status_out)["engines"][0]["state"] == "ready"  # probed with the key from its variable
    # the engine really enforces the key
    base = f"http://127.0.0.1:{port}/v1"
    assert httpx.get(f"{base}/models", timeout=10).status_code == 401
    assert httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {SECRET}"}, timeout=10).status_code == 200
    # private files
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    for f in (home / "engines" / "sec.json", home / "logs" / "sec.log"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    code, out, err = cli("stop", "sec")
    assert code == 0, err
    assert tree_of(rec) == []
