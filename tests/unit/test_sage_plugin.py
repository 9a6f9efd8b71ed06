"""The `sage.cli.plugins` hook `register(target)`, in-process, with both shapes SAGE has shipped: a Typer app (published
isage-cli) and argparse subparsers (SAGE's development branch). tests/e2e/test_sage_published.py runs the published
wheels for real; tests/e2e/test_sage_integration.py runs a stand-in of the argparse branch through real scripts."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import distribution

import pytest
import typer
import typer.main

from sage_llm import doctor
from sage_llm.cli import _output, sage_plugin
from sage_llm.core import sage_cli


def _parser(*own: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """SAGE's argparse shape: a global option, subcommands, plugins registered on the subparsers."""
    parser = argparse.ArgumentParser(prog="sage")
    parser.add_argument("--trace-dir")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("status")
    for name in own:
        sub.add_parser(name).set_defaults(_handler=lambda args: 42)
    return parser, sub


def _sage_typer_app() -> typer.Typer:
    """The published CLI's shape: a Typer app with `status` and its own `llm` group (isagellm's status/config)."""
    app = typer.Typer(name="sage")
    llm = typer.Typer(name="llm")

    @llm.command("status")
    def llm_status() -> None:
        print("isagellm status")

    @app.command("status")
    def status() -> None:
        print("SAGE status")

    app.add_typer(llm, name="llm")
    return app


def _run_typer(app: typer.Typer, *argv: str) -> int:
    try:
        rv = typer.main.get_command(app).main(args=list(argv), prog_name="sage", standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0)
    return rv if isinstance(rv, int) else 0


# ------------------------------------------------------------------------------------------ argparse (dev branch)

@pytest.mark.parametrize(("argv", "expected"), [
    (["vllm", "status", "--json"], ["status", "--json"]),
    (["vllm", "--help"], ["--help"]),
    (["vllm", "--version"], ["--version"]),
    (["vllm"], []),
    (["--trace-dir", "vllm", "vllm", "stop", "vllm"], ["stop", "vllm"]),
    (["--trace-dir=/tmp/t", "vllm", "chat", "-p", "hi vllm"], ["chat", "-p", "hi vllm"]),
])
def test_argparse_everything_after_vllm_reaches_our_app(argv: list[str], expected: list[str]) -> None:
    parser, sub = _parser()
    sage_plugin.register(sub)
    args, _unknown = parser.parse_known_args(argv)
    assert args.command == "vllm"
    assert args._handler is sage_plugin.run_from_sage
    assert sage_plugin.group_args_from(args, argv) == expected


def test_argparse_handler_returns_our_exit_code_and_names_sage_vllm(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """SAGE's branch does `return args._handler(args)`: the handler returns the code (it does not exit)."""
    argv = ["vllm", "stop", "nope"]
    monkeypatch.setattr(sys, "argv", ["sage", *argv])
    parser, sub = _parser()
    sage_plugin.register(sub)
    args, _ = parser.parse_known_args(argv)
    assert args._handler(args) == 2
    err = capsys.readouterr().err
    assert "no engine named 'nope'" in err
    assert "`sage vllm status`" in err  # the hint names the command the user typed


def test_argparse_taken_name_is_left_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """A duplicate subparser raises in SAGE's branch (Python >= 3.11): when `vllm` exists, we add nothing there."""
    parser, sub = _parser("vllm")
    sage_plugin.register(sub)
    args, _ = parser.parse_known_args(["vllm"])
    assert args._handler(args) == 42  # still the other owner's
    assert capsys.readouterr().err == ""


def test_argparse_llm_is_ours_where_free(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SAGE's development branch retired `sage llm`: there the name is ours, beside `vllm`, and names itself."""
    parser, sub = _parser()
    sage_plugin.register(sub)
    assert {"llm", "vllm"} <= set(sub.choices)
    argv = ["--trace-dir", "llm", "llm", "stop", "nope"]
    monkeypatch.setattr(sys, "argv", ["sage", *argv])
    args, _ = parser.parse_known_args(argv)
    assert sage_plugin.group_args_from(args, argv) == ["stop", "nope"]
    assert args._handler(args) == 2
    assert "`sage llm status`" in capsys.readouterr().err  # the hint names the command the user typed


def test_argparse_llm_taken_by_sage_stays_theirs(capsys: pytest.CaptureFixture[str]) -> None:
    parser, sub = _parser("llm")
    sage_plugin.register(sub)
    args, _ = parser.parse_known_args(["llm"])
    assert args._handler(args) == 42
    assert "vllm" in sub.choices
    assert capsys.readouterr().err == ""  # nothing said on every `sage` call


def test_argparse_a_plugin_loaded_after_us_gets_llm(capsys: pytest.CaptureFixture[str]) -> None:
    """Without giving way, its add_parser("llm") would raise `conflicting subparser` and fail SAGE's whole `sage`."""
    parser, sub = _parser()
    sage_plugin.register(sub)
    sub.add_parser("llm", help="theirs").set_defaults(_handler=lambda args: 7)
    args, _ = parser.parse_known_args(["llm"])
    assert args._handler(args) == 7
    helped = parser.format_help()
    assert "{status,vllm,llm}" in helped  # listed once
    assert "theirs" in helped
    assert capsys.readouterr().err == ""


def test_a_plugin_registered_as_llm_keeps_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sage_cli, "other_plugins", lambda: {"studio", "llm"})
    parser, sub = _parser()
    sage_plugin.register(sub)
    assert "llm" not in sub.choices
    assert "vllm" in sub.choices


def test_choose_names_says_why() -> None:
    vllm, llm = sage_cli.choose_names({"status", "llm"}, {"studio"})
    assert (vllm.name, vllm.got, llm.name, llm.got) == ("vllm", True, "llm", False)
    assert "of its own" in llm.why
    vllm, llm = sage_cli.choose_names({"status", "vllm"}, set())
    assert (vllm.got, llm.got) == (False, True)
    assert "free" in llm.why
    assert not sage_cli.choose_names(set(), {"llm"})[1].got


def test_argparse_register_never_raises(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken:
        choices: dict = {}

        def add_parser(self, *a: object, **k: object) -> None:
            raise RuntimeError("boom")

    sage_plugin.register(Broken())  # SAGE's branch turns a raising plugin into a failure of the whole `sage`
    err = capsys.readouterr().err
    assert "cannot add `sage vllm` (RuntimeError: boom)" in err
    assert "sage-llm" in err
    sage_plugin.register(object())  # neither shape
    assert "unknown CLI object" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- Typer (published CLI)

def test_typer_adds_vllm_and_keeps_sages_llm_and_status(capsys: pytest.CaptureFixture[str]) -> None:
    app = _sage_typer_app()
    sage_plugin.register(app)
    assert "vllm" in sage_plugin.typer_names(app)

    assert _run_typer(app, "vllm", "status", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == 1
    assert [e for e in doc["engines"] if e["managed"]] == []

    # options and help after `vllm` are ours, not Typer's (`--help` would otherwise print SAGE's command help)
    assert _run_typer(app, "vllm", "--help") == 0
    out = capsys.readouterr().out
    assert "Usage: sage vllm [OPTIONS] COMMAND" in out
    assert "sage vllm config show" in out  # help texts name the command the user typed

    assert _run_typer(app, "vllm", "status", "nope") == 3
    assert "see `sage vllm status`" in capsys.readouterr().err
    assert _run_typer(app, "vllm", "stop", "--no-such-flag") == 2
    assert "no-such-flag" in capsys.readouterr().err

    # SAGE's own commands, including its `llm` group (same subcommand name `status` as ours), are untouched
    assert _run_typer(app, "status") == 0
    assert capsys.readouterr().out.strip() == "SAGE status"
    assert _run_typer(app, "llm", "status") == 0
    assert capsys.readouterr().out.strip() == "isagellm status"


def test_typer_published_shape_gives_us_vllm_only(capsys: pytest.CaptureFixture[str]) -> None:
    """The published CLI has its own `llm` group: nothing of ours goes under `llm`, and nothing is said about it."""
    app = _sage_typer_app()
    before = [(g.name, g.typer_instance) for g in app.registered_groups]
    sage_plugin.register(app)
    assert [(g.name, g.typer_instance) for g in app.registered_groups] == before
    assert [c.name for c in app.registered_commands if c.name in ("llm", "vllm")] == ["vllm"]
    assert capsys.readouterr().err == ""


def test_typer_llm_is_ours_where_free(capsys: pytest.CaptureFixture[str]) -> None:
    app = typer.Typer(name="sage")

    @app.command("status")
    def status() -> None:
        print("SAGE status")

    sage_plugin.register(app)
    assert {"llm", "vllm"} <= sage_plugin.typer_names(app)
    assert _run_typer(app, "llm", "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["schema_version"] == 1
    assert _run_typer(app, "llm", "status", "nope") == 3
    assert "see `sage llm status`" in capsys.readouterr().err


def test_typer_taken_name_is_left_alone(capsys: pytest.CaptureFixture[str]) -> None:
    app = _sage_typer_app()

    @app.command("vllm")
    def theirs() -> None:
        print("their vllm")

    before = len(app.registered_commands)
    sage_plugin.register(app)
    assert len(app.registered_commands) == before
    assert _run_typer(app, "vllm") == 0
    assert capsys.readouterr().out.strip() == "their vllm"


def test_typer_names_include_unnamed_commands_and_groups() -> None:
    app = typer.Typer()

    @app.command()
    def my_cmd() -> None: ...

    app.add_typer(typer.Typer(name="grp"))
    assert {"my-cmd", "grp"} <= sage_plugin.typer_names(app)


# ------------------------------------------------------------------------------------------- names, metadata, doctor

def test_no_sage_script_only_sage_llm_and_the_vllm_plugin() -> None:
    """We never install `sage` (it replaced SAGE's and SageMath's); the plugin entry point is `vllm`."""
    eps = distribution("sage-llm").entry_points
    scripts = {ep.name: ep.value for ep in eps if ep.group == "console_scripts"}
    assert scripts == {"sage-llm": "sage_llm.cli.main:main"}
    plugins = {ep.name: ep.value for ep in eps if ep.group == sage_cli.PLUGIN_GROUP}
    assert plugins == {sage_cli.GROUP: sage_cli.PLUGIN_VALUE}
    assert sage_cli.plugin_registered()


@pytest.mark.parametrize(("prog", "text", "expected"), [
    ("sage vllm", "see `sage-llm status` or sage-llm stop x", "see `sage vllm status` or sage vllm stop x"),
    ("python -m sage_llm", "see `sage-llm --help`", "see `python -m sage_llm --help`"),
    ("sage vllm", "pip install sage-llm; sage-llm's key; `sage-llm ...` works; ~/.sage-llm/x; my-sage-llm x",
     "pip install sage-llm; sage-llm's key; `sage-llm ...` works; ~/.sage-llm/x; my-sage-llm x"),
    ("sage vllm", "not started by sage-llm", "not started by sage-llm"),
    ("sage-llm", "see `sage-llm status`", "see `sage-llm status`"),
])
def test_named_spells_the_command_as_typed(prog: str, text: str, expected: str) -> None:
    assert _output.named(text, prog) == expected


def test_doctor_says_where_the_commands_are(monkeypatch: pytest.MonkeyPatch) -> None:
    [c] = doctor.check_sage()  # the dev venv has no SAGE
    assert (c.name, c.status) == ("sage", doctor.OK)
    assert "`sage-llm ...`" in c.message
    published = sage_cli.SageCli("isage-cli", "0.2.4.43", "typer", "sage.cli.main:app")
    monkeypatch.setattr(sage_cli, "installed", lambda: published)
    monkeypatch.setattr(sage_cli, "names_in_sage", lambda cli, timeout: sage_cli.choose_names({"llm"}, set()))
    [c] = doctor.check_sage()
    assert c.status == doctor.OK
    assert "the commands are also under `vllm` there" in c.message
    assert "`llm` not ours: SAGE's `sage` has an `llm` command of its own" in c.message
    assert "isagellm" in c.message
    assert _output.named(c.message, "sage-llm") == c.message  # nothing in it is respelled
    monkeypatch.setattr(sage_cli, "names_in_sage", lambda cli, timeout: sage_cli.choose_names(set(), set()))
    [c] = doctor.check_sage()
    assert "the commands are also under `vllm` and `llm` there" in c.message
    assert "`llm` ours: free" in c.message
    monkeypatch.setattr(sage_cli, "names_in_sage", lambda cli, timeout: "`sage --help` did not finish")
    [c] = doctor.check_sage()
    assert c.status == doctor.WARN
    assert "did not finish" in c.message
    monkeypatch.setattr(sage_cli, "plugin_registered", lambda: False)
    [c] = doctor.check_sage()
    assert c.status == doctor.WARN
    assert "reinstall" in (c.fix or "")
