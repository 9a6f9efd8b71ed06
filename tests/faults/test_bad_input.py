"""The bad-input table (docs/reliability.md): wrong invocations across every command.

Each one: the documented exit code (2 = bad input; `status NAME` documents 3), exactly one line on stderr that starts
with "Error:" and names the problem and the fix, no traceback, and no file written in the state directory.
Print the table for the docs with: python -m tests.faults.test_bad_input
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import free_port

# (arguments, exit code, a fragment the one-line error must contain)
TABLE: list[tuple[list[str], int, str]] = [
    (["start", "org/x", "--port", "0"], 2, "port 0 is out of range"),
    (["start", "org/x", "--port", "70000"], 2, "port 70000 is out of range"),
    (["start", "org/x", "--port", "abc"], 2, "'--port'"),
    (["start", "org/x", "--gpu-memory-utilization", "0"], 2, "--gpu-memory-utilization 0.0 is out of range"),
    (["start", "org/x", "--gpu-memory-utilization", "1.5"], 2, "--gpu-memory-utilization 1.5 is out of range"),
    (["start", "org/x", "--gpu-memory-utilization", "lots"], 2, "'--gpu-memory-utilization'"),
    (["start", "org/x", "--quantization", "awqq"], 2, "unknown quantization method 'awqq'"),
    (["start", "/no/such/model/dir"], 2, "does not exist"),
    (["start", "org/x", "--name", "a/b"], 2, "invalid engine name 'a/b'"),
    (["start", "org/x", "--name", "x;rm -rf ~"], 2, "invalid engine name"),
    (["start", "org/x", "--name", "$(reboot)"], 2, "invalid engine name"),
    (["start", "org/x", "--timeout", "-5"], 2, "--timeout -5 must be positive"),
    (["start", "org/x", "--max-model-len", "lots"], 2, "--max-model-len 'lots' is not a length"),
    (["start", "org/x", "--dtype", "int3"], 2, "unknown --dtype 'int3'"),
    (["start", "org/x", "--tensor-parallel-size", "0"], 2, "--tensor-parallel-size 0 must be 1 or more"),
    (["start", "org/x", "--api-key-env", "SAGE_TEST_NOT_SET_XYZ"], 2, "SAGE_TEST_NOT_SET_XYZ, which is not set"),
    (["start", "org/x", "--api-key-env", "not a var"], 2, "is not a variable name"),
    (["start", "org/x", "--", "--api-key", "sk-123"], 2, "would put a secret on the command line"),
    (["start", "a/b/c"], 2, "neither an existing path nor a hub id"),
    (["start", "org/x", "--no-such-flag"], 2, "No such option"),
    (["stop", "nosuch"], 2, "no engine named 'nosuch'"),
    (["stop", "a/b"], 2, "invalid engine name 'a/b'"),
    (["stop", "x", "--all"], 2, "not both"),
    (["stop", "65000"], 2, "no engine on port 65000"),
    (["status", "nosuch"], 3, "no engine named or on port 'nosuch'"),
    (["logs", "nosuch"], 2, "nosuch"),
    (["logs", "-n", "-5"], 2, "-5"),
    (["logs", "--since", "banana"], 2, "banana"),
    (["chat", "-p", ""], 2, "empty"),
    (["chat", "--source", "moon", "-p", "hi"], 2, "moon"),
    (["chat", "--temperature", "hot", "-p", "hi"], 2, "'--temperature'"),
    (["chat", "--max-tokens", "0", "-p", "hi"], 2, "--max-tokens"),
    (["models", "rm", "not/cached", "-y"], 2, "not/cached"),
    (["models", "import", "/no/such/file.gguf", "--as", "org/name"], 2, "/no/such/file.gguf"),
    (["models", "pull", "not a repo id"], 2, "not a repo id"),
    (["config", "set", "no_such_key", "1"], 2, "no_such_key"),
    (["config", "set", "local_engine_port", "abc"], 2, "abc"),
    (["top", "-n", "0"], 2, "-n"),
    (["restart", "nosuch"], 2, "nosuch"),
    (["switch", "nosuch", "org/x"], 2, "nosuch"),
    (["engine", "install", "--cpu", "--gpu"], 2, "--cpu and --gpu exclude each other"),
]


def _tree(path: Path) -> list[str]:
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize(("args", "code", "fragment"), TABLE, ids=[" ".join(a)[:60] for a, _, _ in TABLE])
def test_bad_input(cli, home, fake_vllm, monkeypatch, args, code, fragment):
    monkeypatch.delenv("SAGE_TEST_NOT_SET_XYZ", raising=False)
    before = _tree(home)
    got, out, err = cli(*args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code, (got, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert _tree(home) == before, "bad input wrote to the state directory"
    if code == 2:
        assert "hint:" in lines[0] or "--help" in lines[0], "the error should say what to do"


def test_table_is_large_enough_and_documented():
    assert len(TABLE) >= 30
    doc = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    missing = [" ".join(a) for a, _, _ in TABLE if f"`sage-llm {' '.join(a)}`" not in doc]
    assert not missing, f"docs/reliability.md lacks rows (regenerate: python -m tests.faults.test_bad_input): {missing}"


def markdown() -> str:
    rows = ["| invocation | exit | the one-line error names |", "|---|---|---|"]
    for args, code, fragment in TABLE:
        inv = " ".join(args)
        rows.append(f"| `sage-llm {inv}` | {code} | {fragment.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    print(markdown())


# An empty model name is a mistake (an unset shell variable, say), never a request for the default model: exit 2, one
# line, nothing started. Kept out of TABLE only because `sage llm start ` would read badly in the docs table.
EMPTY_MODEL: list[tuple[list[str], str]] = [
    (["start", ""], "MODEL is empty"),
    (["start", "  ", "--no-wait"], "MODEL is empty ('  ')"),
    (["run", ""], "MODEL is empty"),
    (["run", "\t"], "MODEL is empty"),
    (["chat", "--model", "", "-p", "hi"], "--model is empty"),
    (["chat", "--model", " ", "--source", "local", "-p", "hi"], "--model is empty"),
    (["bench", "--model", ""], "--model is empty"),
    (["bench", "--url", "http://127.0.0.1:9/v1", "--model", " "], "--model is empty"),
]


@pytest.mark.parametrize(("args", "fragment"), EMPTY_MODEL, ids=[repr(a) for a, _ in EMPTY_MODEL])
def test_empty_model_name_is_bad_input(cli, home, fake_vllm, monkeypatch, args, fragment):
    from sage_llm.engine import manager

    started: list[object] = []

    def no_start(*a, **k):
        started.append(a)
        raise RuntimeError("an engine was started for an empty model name")

    monkeypatch.setattr(manager, "start", no_start)
    before = _tree(home)
    got, out, err = cli(*args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert (got, out, started) == (2, "", []), err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"Error: {fragment}"), lines[0]
    assert "hint:" in lines[0]
    assert _tree(home) == before


@pytest.mark.parametrize("args", [["switch", "e1", ""], ["switch", "e1", " ", "--rolling"],
                                  ["restart", "e1", "--model", ""]])
def test_empty_model_name_changes_no_engine(cli, fake_vllm, stop_all, args):
    from sage_llm.core.state import StateStore

    code, _out, err = cli("start", "org/x", "--name", "e1", "--port", str(free_port()))
    assert code == 0, err
    rec = StateStore().load("e1")
    got, out, err = cli(*args)
    assert (got, out) == (2, ""), err
    assert err.startswith(("Error: MODEL is empty", "Error: --model is empty")), err
    assert len(err.splitlines()) == 1, err
    after = StateStore().load("e1")
    assert (after.id, after.pid, after.model) == (rec.id, rec.pid, "org/x")
