"""cli/llm.py's LazyGroup: a command imports only its own module; `--help` still lists every command with its help."""

from __future__ import annotations

import json
import subprocess
import sys

from sage_llm.cli.llm import COMMANDS

PROBE = """
import contextlib, io, json, sys
from sage_llm.cli.main import run
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = run({argv!r})
loaded = sorted(m.rsplit(".", 1)[1] for m in sys.modules if m.startswith("sage_llm.cli.commands."))
print(json.dumps({{"code": code, "loaded": loaded, "out": out.getvalue()}}))
"""


def _run(argv: list[str], tmp_path) -> dict:
    env = {"SAGE_LLM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "SAGE_LLM_DOTENV": "", "COLUMNS": "200",
           "SAGE_LLM_CONFIG": str(tmp_path / "none.toml")}
    res = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_command_loads_only_its_own_module(tmp_path) -> None:
    doc = _run(["stop", "--help"], tmp_path)
    assert doc["code"] == 0
    assert "Usage:" in doc["out"]
    assert doc["loaded"] == ["stop"]


def test_a_group_loads_only_its_own_module(tmp_path) -> None:
    doc = _run(["config", "--help"], tmp_path)
    assert doc["code"] == 0
    assert doc["loaded"] == ["config"]


def test_help_lists_every_command_with_its_help(tmp_path) -> None:
    doc = _run(["--help"], tmp_path)
    assert doc["code"] == 0
    listed = {}
    for line in doc["out"].split("Commands:", 1)[1].splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] in COMMANDS:
            listed[parts[0]] = parts[1]
    assert sorted(listed) == sorted(COMMANDS)
    assert all(text.strip() for text in listed.values())
    assert "Start a vLLM engine" in listed["start"]


def test_an_unknown_command_is_a_usage_error(tmp_path) -> None:
    doc = _run(["no-such-command"], tmp_path)
    assert doc["code"] == 2
    assert doc["loaded"] == []
