"""Security checks on the fast tier: default bind, warnings, private files, refused state directories."""

from __future__ import annotations

import json
import os
import stat

import psutil

from tests.support.ports import free_port


def test_default_bind_is_loopback(cli, fake_vllm, home, stop_all):
    port = free_port()
    code, out, err = cli("start", "org/sec", "--port", str(port))
    assert code == 0, err
    rec = json.loads((home / "engines" / "sec.json").read_text())
    assert rec["host"] == "127.0.0.1"
    assert "--host" in rec["argv"]
    assert rec["argv"][rec["argv"].index("--host") + 1] == "127.0.0.1"
    conns = [c for c in psutil.Process(rec["pid"]).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert [c.laddr.ip for c in conns] == ["127.0.0.1"]
    for path in (home / "engines" / "sec.json", home / "logs" / "sec.log"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700


def test_public_bind_without_key_warns(cli, fake_vllm, home, stop_all):
    code, out, err = cli("start", "org/pub", "--port", str(free_port()), "--host", "0.0.0.0")
    assert code == 0, err
    assert "Warning:" in err
    assert "no API key" in err


def test_symlinked_state_dir_is_refused(cli, fake_vllm, tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("SAGE_LLM_HOME", str(link))
    code, out, err = cli("start", "org/x", "--port", str(free_port()))
    assert code == 1
    assert "symlink" in err
    assert list(real.iterdir()) == []


def test_foreign_owned_state_dir_is_refused(cli, fake_vllm, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 4242, 4242)
    monkeypatch.setenv("SAGE_LLM_HOME", str(other))
    code, out, err = cli("status")
    assert code == 1
    assert "owned by uid 4242" in err
    code, out, err = cli("start", "org/x", "--port", str(free_port()))
    assert code == 1
    assert list(other.iterdir()) == []
