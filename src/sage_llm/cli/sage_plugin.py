"""Our group inside SAGE's own `sage` command: the `sage.cli.plugins` entry point `register(target)`.

SAGE has shipped two shapes of `sage`, and `register` accepts both (as isage-studio's `register_studio_command` does):

* **Typer** (published isage-cli 0.2.4.x, console script `sage = sage.cli.main:app`): at import, SAGE calls
  `ep.load()(app)` with its Typer app and swallows any exception. We add one command, `vllm`, that takes every word
  after it and runs our CLI (`main.run`) with them.
* **argparse** (SAGE's development branch, `sage = sage.cli.main:main`): SAGE calls every plugin with its subparsers
  object, parses with `parse_known_args` and dispatches through `args._handler(args)`, whose return value is the exit
  code. A plugin that raises, or a duplicate subcommand name, makes the whole `sage` fail.

The name is `vllm` (`sage_llm.cli.sage_cli.GROUP`), not `llm`: the published CLI already has an `llm` group (isagellm).
`register` never raises and never replaces a command SAGE or another plugin already has: when the name is taken it adds
nothing (`sage-llm doctor` says where the commands are). It imports nothing heavy: SAGE loads every plugin on every
`sage` invocation, so our CLI is imported only when `sage vllm ...` runs.

Either way, our own error handling, exit codes (0/1/2/3) and the Typer-free `status --json` fast path run unchanged
under the program name `sage vllm`, so help and hints name the command the user typed.
"""

import argparse
import sys
from typing import Any

from sage_llm.cli.sage_cli import GROUP

PROG = f"sage {GROUP}"
HELP = "Run and watch local vLLM engines (sage-llm): start, stop, status, chat, logs, models. See `sage vllm --help`."


def register(target: Any) -> None:
    """Entry point `sage.cli.plugins`: add `sage vllm ...` to SAGE's `sage`, a Typer app or argparse subparsers."""
    try:
        if hasattr(target, "add_parser") and hasattr(target, "choices"):
            _register_argparse(target)
        elif hasattr(target, "registered_commands") and hasattr(target, "registered_groups"):
            _register_typer(target)
        else:
            _warn(f"cannot add `{PROG}`: unknown CLI object {type(target).__name__}; use `sage-llm` instead")
    except Exception as exc:  # never break SAGE's `sage` (its argparse branch fails entirely when a plugin raises)
        _warn(f"cannot add `{PROG}` ({type(exc).__name__}: {exc}); use `sage-llm` instead")


def _warn(msg: str) -> None:
    sys.stderr.write(f"Warning: sage-llm: {msg}\n")


def typer_names(app: Any) -> set[str]:
    """The command and group names a Typer app already has (what Typer derives when `name` was not given)."""
    names = set()
    for info in getattr(app, "registered_commands", []):
        name = info.name or getattr(info.callback, "__name__", "").replace("_", "-")
        names.add(name)
    for info in getattr(app, "registered_groups", []):
        sub = getattr(info, "typer_instance", None)
        name = info.name or getattr(getattr(sub, "info", None), "name", None)
        if name:
            names.add(name)
    return names


def _register_typer(app: Any) -> None:
    if GROUP in typer_names(app):
        return  # taken: never hide another command (`sage-llm doctor` tells the user)
    import typer  # SAGE's app is a Typer app: Typer is already loaded

    # (no `from __future__ import annotations` in this module: Typer must see `typer.Context` itself, not a string)
    @app.command(GROUP, help=HELP, add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                   "allow_interspersed_args": False, "help_option_names": []})
    def vllm(ctx: typer.Context) -> None:
        from sage_llm.cli.main import run

        code = run(list(ctx.args), PROG)
        sys.stdout.flush()
        raise SystemExit(code)


def _register_argparse(subparsers: Any) -> None:
    if GROUP in subparsers.choices:
        return  # taken: a duplicate name would make SAGE's `sage` fail
    parser = subparsers.add_parser(GROUP, help=HELP, description=HELP, add_help=False)
    parser.add_argument("group_args", nargs=argparse.REMAINDER, help=f"arguments for `{PROG}` (see `{PROG} --help`)")
    # SAGE dispatches plugins through `_handler`; `func` serves parsers that call `args.func(args)` instead
    parser.set_defaults(_handler=run_from_sage, func=run_from_sage)


def group_args_from(args: Any, argv: list[str] | None = None) -> list[str]:
    """Everything after `vllm` on the command line.

    argparse splits it: words that look like options before the first positional (`sage vllm --help`) land in
    `parse_known_args`'s unknown list, which SAGE does not pass to plugins. So take the words after the `vllm`
    subcommand from the real command line, and fall back to what argparse collected.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    collected = list(getattr(args, "group_args", None) or [])
    for i, word in enumerate(argv):
        if word != GROUP:
            continue
        prev = argv[i - 1] if i else ""
        if prev.startswith("-") and "=" not in prev:  # `--trace-dir vllm`: the value of an option, not the command
            continue
        rest = argv[i + 1:]
        if rest[len(rest) - len(collected):] == collected or not collected:
            return rest
    return collected


def run_from_sage(args: Any = None, *_: Any) -> int:
    """Handler for `sage vllm ...` under SAGE's argparse CLI: run our CLI and return its exit code."""
    from sage_llm.cli.main import run

    code = run(group_args_from(args), PROG)
    sys.stdout.flush()
    return code
