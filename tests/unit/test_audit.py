"""The audit log: one JSON line per operation, 0600, secrets redacted, safe under concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from sage_llm.core import audit
from sage_llm.core.errors import EngineFailed


def test_record_writes_one_private_json_line(home: Path) -> None:
    entry = audit.record("model pull", {"repo": "Qwen/Qwen2.5-0.5B", "revision": None}, "ok", 1.23456,
                         result={"bytes": 1000})
    path = home / "audit.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc == entry
    assert doc["command"] == "model pull"
    assert doc["args"] == {"repo": "Qwen/Qwen2.5-0.5B", "revision": None}
    assert doc["outcome"] == "ok"
    assert doc["duration_s"] == 1.235
    assert doc["pid"] == os.getpid()
    assert doc["user"]
    assert doc["time"].endswith("Z")
    assert doc["result"] == {"bytes": 1000}


def test_secrets_are_redacted() -> None:
    args = {
        "api_key": "sk-live-abcdefghijkl",
        "hf_token": "hf_abcdefghijklmnop",
        "api_key_env": "MY_KEY",  # a variable's name is not a secret
        "extra_args": ["--api-key", "s3cr3t", "--hf-token=hf_zzzzzzzzzzzz", "--max-model-len", "4096"],
        "note": "HF_TOKEN=hf_abcdefghijklmnop and OPENAI_API_KEY=xyz",
        "nested": {"password": "pw", "port": 8001},
    }
    red = audit.redact(args)
    assert red["api_key"] == "***"
    assert red["hf_token"] == "***"
    assert red["api_key_env"] == "MY_KEY"
    assert red["extra_args"] == ["--api-key", "***", "--hf-token=***", "--max-model-len", "4096"]
    assert "hf_abc" not in red["note"]
    assert "xyz" not in red["note"]
    assert red["nested"] == {"password": "***", "port": 8001}
    assert "s3cr3t" not in json.dumps(red)


def test_operation_records_ok_error_and_interrupt(home: Path) -> None:
    with audit.operation("stop", {"name": "a"}) as op:
        op.result = {"stopped": True}
    with pytest.raises(EngineFailed), audit.operation("start", {"model": "m"}):
        raise EngineFailed("engine 'm' exited during startup: port 8001 is already in use")
    with pytest.raises(KeyboardInterrupt), audit.operation("run", {"model": "m"}):
        raise KeyboardInterrupt
    entries = audit.read()
    assert [(e["command"], e["outcome"]) for e in entries] == [("stop", "ok"), ("start", "error"),
                                                               ("run", "interrupted")]
    assert entries[1]["error"] == "engine 'm' exited during startup: port 8001 is already in use"
    assert audit.read(2) == entries[1:]


def test_audited_decorator_takes_the_call_arguments(home: Path) -> None:
    @audit.audited("model rm")
    def remove(repo: str, yes: bool = False, store: object = None, progress=None) -> dict:
        return {"freed": 10}

    assert remove("org/m", yes=True, progress=print) == {"freed": 10}
    (entry,) = audit.read()
    assert entry["command"] == "model rm"
    assert entry["args"] == {"repo": "org/m", "yes": True}  # callables and the store are left out


def test_audit_failure_never_breaks_the_operation(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "audit.jsonl").mkdir()  # cannot be opened as a file
    assert audit.record("stop", {}, "ok", 0.1) is None
    with audit.operation("stop", {}):
        pass


def _writer(home: str, k: int) -> None:
    os.environ["SAGE_LLM_HOME"] = home
    for i in range(50):
        audit.record("start", {"writer": k, "i": i, "pad": "x" * 300}, "ok", 0.0)


def test_concurrent_writers_do_not_interleave(home: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(home), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    lines = (home / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 200
    seen = {(d["args"]["writer"], d["args"]["i"]) for d in map(json.loads, lines)}
    assert len(seen) == 200


def test_engine_install_is_audited(home: Path, tmp_path: Path) -> None:
    """`engine install` over an environment that already has the right vLLM: recorded with its result."""
    import sys

    from sage_llm.engine import envs

    venv = tmp_path / "env"
    (venv / "bin").mkdir(parents=True)
    # a python that runs everything but pip: nothing can ever be installed for real by this test
    (venv / "bin" / "python").write_text(
        f'#!/bin/sh\n[ "$1" = "-m" ] && [ "$2" = "pip" ] && {{ echo "ERROR: no pip in this test" >&2; exit 1; }}\n'
        f'exec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    vllm = venv / "bin" / "vllm"
    vllm.write_text("#!/bin/sh\necho 0.33.0\n")
    vllm.chmod(0o755)
    env = envs.install("gpu", venv)
    assert env.version == "0.33.0"
    (entry,) = audit.read()
    assert entry["command"] == "engine install"
    assert entry["outcome"] == "ok"
    assert entry["args"]["kind"] == "gpu"
    assert entry["args"]["path"] == str(venv)
    assert entry["result"]["version"] == "0.33.0"
    # a failing install is recorded as an error: vLLM does not run, and installing it fails
    vllm.write_text("#!/bin/sh\nexit 1\n")
    with pytest.raises(Exception, match="failed"):
        envs.install("gpu", venv)
    assert [(e["command"], e["outcome"]) for e in audit.read()] == [("engine install", "ok"),
                                                                    ("engine install", "error")]
