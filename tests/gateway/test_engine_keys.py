"""Engines a gateway started are usable by the same user's own tools (issue 21 defect 7): `status --json` says they
need a key and where it comes from, `chat`, `bench` and the status probes derive it as a restarted gateway does;
the secret it derives from is private to the user."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from sage_llm.core.state import StateStore
from tests.gateway.conftest import MODEL_A


def _gateway_engine(gateway) -> tuple[object, str]:
    gw = gateway(keep_engines=True)
    r = gw.chat(MODEL_A)
    assert r.status_code == 200
    return gw, r.headers["x-sage-llm-engine"]


def test_status_json_says_the_engine_needs_a_key_and_probes_send_it(gateway, cli) -> None:
    _gw, name = _gateway_engine(gateway)
    log = Path(StateStore().load(name).log_file)
    before = log.read_text(errors="replace").count('"GET /v1/models" 401')
    code, out, err = cli("status", name, "--json")
    assert code == 0, err
    [engine] = json.loads(out)["engines"]
    assert engine["state"] == "ready"
    assert (engine["auth"], engine["key_source"]) == ("key", "gateway")
    assert log.read_text(errors="replace").count('"GET /v1/models" 401') == before  # the probe sent the key


def test_chat_and_bench_reach_a_gateway_engine(gateway, cli) -> None:
    _gw, name = _gateway_engine(gateway)
    code, out, err = cli("chat", name, "-p", "hi", "--plain")
    assert code == 0, err
    assert "Hello from the fake vLLM." in out
    code, out, err = cli("bench", name, "-c", "2", "-n", "4", "--max-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["completed"] == 4


def test_the_secret_is_private_and_needed(gateway, cli, home) -> None:
    _gw, name = _gateway_engine(gateway)
    secret = home / "gateway.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) & 0o077 == 0
    # without the secret (another user cannot read it) the key cannot be derived: a clear hint, not a bare 401
    secret.rename(home / "gateway.key.moved")
    try:
        code, _out, err = cli("chat", name, "-p", "hi", "--plain")
        assert code != 0
        assert "gateway secret" in err
    finally:
        (home / "gateway.key.moved").rename(secret)
