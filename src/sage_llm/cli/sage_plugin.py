"""Our commands inside SAGE's own `sage` command: the `sage.cli.plugins` entry point `register(target)`.

SAGE has shipped two shapes of `sage`, and `register` accepts both (as isage-studio's `register_studio_command` does):

* **Typer** (published isage-cli 0.2.4.x, console script `sage = sage.cli.main:app`): at import, SAGE calls
  `ep.load()(app)` with its Typer app and swallows any exception. We add commands that take every word after them
  and run our CLI (`main.run`) with them.
* **argparse** (SAGE's development branch, `sage = sage.cli.main:main`): SAGE calls every plugin with its subparsers
  object, parses with `parse_known_args` and dispatches through `args._handler(args)`, whose return value is the exit
  code. A plugin that raises, or a duplicate subcommand name, makes the whole `sage` fail.

The names (core/sage_cli.py `choose_names`): `vllm` always, `llm` where neither SAGE nor another plugin has it (the
published CLI has its own `llm` group, isagellm; the development branch retired its `sage llm`). `register` never
raises, never replaces a command SAGE or another plugin already has, and prints nothing when a name is taken
(`sage-llm doctor` says which names we got and why). In the argparse shape a plugin loaded after us that adds `llm`
gets it: ours is taken out first, since argparse would raise on the duplicate and fail SAGE's whole `sage`. (In the
Typer shape a later group of the same name wins by itself.) It imports nothing heavy: SAGE loads every plugin on every
`sage` invocation, so our CLI is imported only when `sage vllm ...` / `sage llm ...` runs.

Either way, our own error handling, exit codes (0/1/2/3) and the Typer-free `status --json` fast path run unchanged
under the program name the user typed (`sage vllm`, `sage llm`), so help and hints name that command.
"""

import argparse
import sys
from typing import Any

from sage_llm.core import sage_cli
from sage_llm.core.sage_cli import GROUP, LLM

PROG = f"sage {GROUP}"
HELP = ("Run and watch local vLLM engines (sage-llm): start, stop, status, chat, logs, models. See `sage {name} "
        "--help`.")


def register(target: Any) -> None:
    """Entry point `sage.cli.plugins`: add our commands to SAGE's `sage`, a Typer app or argparse subparsers."""
    try:
        if hasattr(target, "add_parser") and hasattr(target, "choices"):
            shape, taken = "argparse", set(target.choices)
        elif hasattr(target, "registered_commands") and hasattr(target, "registered_groups"):
            shape, taken = "typer", typer_names(target)
        else:
            _warn(f"cannot add `{PROG}`: unknown CLI object {type(target).__name__}; use `sage-llm` instead")
            return
        names = sage_cli.choose_names(taken, sage_cli.other_plugins())
        for n in names:
            if n.got:
                (_register_argparse if shape == "argparse" else _register_typer)(target, n.name)
        sage_cli.report(shape, names)
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


def _register_typer(app: Any, name: str) -> None:
    import typer  # SAGE's app is a Typer app: Typer is already loaded

    prog = f"sage {name}"

    # (no `from __future__ import annotations` in this module: Typer must see `typer.Context` itself, not a string)
    def command(ctx: typer.Context) -> None:
        from sage_llm.cli.main import run

        code = run(list(ctx.args), prog)
        sys.stdout.flush()
        raise SystemExit(code)

    app.command(name, help=HELP.format(name=name), add_help_option=False,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                  "allow_interspersed_args": False, "help_option_names": []})(command)


def _register_argparse(subparsers: Any, name: str) -> None:
    text = HELP.format(name=name)
    parser = subparsers.add_parser(name, help=text, description=text, add_help=False)
    parser.add_argument("group_args", nargs=argparse.REMAINDER, help=f"arguments for `sage {name}` (see "
                                                                     f"`sage {name} --help`)")
    # SAGE dispatches plugins through `_handler`; `func` serves parsers that call `args.func(args)` instead
    parser.set_defaults(_handler=run_from_sage, func=run_from_sage, _sage_llm_name=name)
    if name == LLM:
        _give_way(subparsers, name)


def _give_way(subparsers: Any, name: str) -> None:
    """A plugin loaded after us that adds `name` gets it: ours is removed just before (argparse raises on a duplicate
    name, and SAGE's branch turns that into a failure of its whole `sage`)."""
    add = subparsers.add_parser

    def add_parser(*args: Any, **kwargs: Any) -> Any:
        if args and args[0] == name and name in subparsers.choices:
            subparsers.choices.pop(name, None)
            actions = getattr(subparsers, "_choices_actions", [])
            actions[:] = [a for a in actions if getattr(a, "dest", None) != name]
        return add(*args, **kwargs)

    subparsers.add_parser = add_parser


def group_args_from(args: Any, argv: list[str] | None = None) -> list[str]:
    """Everything after our command's name (`vllm` or `llm`) on the command line.

    argparse splits it: words that look like options before the first positional (`sage vllm --help`) land in
    `parse_known_args`'s unknown list, which SAGE does not pass to plugins. So take the words after the subcommand
    from the real command line, and fall back to what argparse collected.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = getattr(args, "_sage_llm_name", None) or GROUP
    collected = list(getattr(args, "group_args", None) or [])
    for i, word in enumerate(argv):
        if word != name:
            continue
        prev = argv[i - 1] if i else ""
        if prev.startswith("-") and "=" not in prev:  # `--trace-dir vllm`: the value of an option, not the command
            continue
        rest = argv[i + 1:]
        if rest[len(rest) - len(collected):] == collected or not collected:
            return rest
    return collected


def run_from_sage(args: Any = None, *_: Any) -> int:
    """Handler for `sage vllm ...` / `sage llm ...` under SAGE's argparse CLI: run our CLI, return its exit code."""
    from sage_llm.cli.main import run

    code = run(group_args_from(args), f"sage {getattr(args, '_sage_llm_name', None) or GROUP}")
    sys.stdout.flush()
    return code
