"""The `sage.cli.plugins` hook and the hand-over to SAGE's CLI, in-process (the venv test runs them for real)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from sage_llm.cli import sage_plugin


def _parser() -> argparse.ArgumentParser:
    """SAGE's parser shape: a global option, subcommands, plugins registered on the subparsers."""
    parser = argparse.ArgumentParser(prog="sage")
    parser.add_argument("--trace-dir")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("status")
    sage_plugin.register(sub)
    return parser


@pytest.mark.parametrize(("argv", "expected"), [
    (["llm", "status", "--json"], ["status", "--json"]),
    (["llm", "--help"], ["--help"]),
    (["llm", "--version"], ["--version"]),
    (["llm"], []),
    (["--trace-dir", "llm", "llm", "stop", "llm"], ["stop", "llm"]),
    (["--trace-dir=/tmp/t", "llm", "chat", "-p", "hi llm"], ["chat", "-p", "hi llm"]),
])
def test_everything_after_llm_reaches_our_app(argv: list[str], expected: list[str]) -> None:
    args, _unknown = _parser().parse_known_args(argv)
    assert args.command == "llm"
    assert args._handler is sage_plugin.run_from_sage
    assert sage_plugin.llm_args_from(args, argv) == expected


def test_handler_exits_with_our_exit_code(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    argv = ["llm", "config", "set", "gpu_util", "7"]
    monkeypatch.setattr(sys, "argv", ["sage", *argv])
    args, _ = _parser().parse_known_args(argv)
    with pytest.raises(SystemExit) as info:
        args._handler(args)
    assert info.value.code == 2
    assert "gpu_util" in capsys.readouterr().err


def test_a_sage_package_without_sages_console_script_is_not_sages_cli(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Another package called `sage` (SageMath) with a `sage.cli.main` never receives our commands."""
    pkg = tmp_path / "sage" / "cli"
    pkg.mkdir(parents=True)
    (tmp_path / "sage" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text("def main():\n    raise SystemExit('not SAGE')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "sage" or m.startswith("sage.")]:
        monkeypatch.delitem(sys.modules, mod)
    try:
        assert sage_plugin.sage_cli_available() is False
        assert sage_plugin.delegate_to_sage(["status"]) is None
    finally:
        for mod in [m for m in sys.modules if m == "sage" or m.startswith("sage.")]:
            del sys.modules[mod]


def test_without_sage_nothing_is_delegated() -> None:
    assert sage_plugin.sage_cli_available() is False
    assert sage_plugin.delegate_to_sage(["status"]) is None
