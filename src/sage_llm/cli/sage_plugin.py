"""Fitting into SAGE's own argparse `sage` command (package `isage`, module `sage.cli.main`).

SAGE's `main()` builds an argparse parser, calls every entry point of the `sage.cli.plugins` group with its
subparsers object, parses with `parse_known_args`, and dispatches a plugin's subcommand through `args._handler(args)`.

* `register(subparsers)` is our entry point there: it adds `llm`, whose handler hands everything after `sage llm` to
  our Typer app. It imports nothing heavy: SAGE loads every plugin on every `sage` invocation.
* `delegate_to_sage(argv)`: when our own `sage` script runs anything but `llm` and SAGE's CLI is importable, it hands
  the invocation over, so installing both never breaks `sage status` or `sage studio`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Any

SAGE_MODULE = "sage.cli.main"
HELP = "Run and watch local vLLM inference engines (sage-llm): start, stop, status, models, logs, chat."


def register(subparsers: Any) -> None:
    """Entry point `sage.cli.plugins: llm`: add `sage llm ...` to SAGE's argparse CLI."""
    parser = subparsers.add_parser("llm", help=HELP, description=HELP, add_help=False)
    parser.add_argument("llm_args", nargs=argparse.REMAINDER, help="arguments for `sage llm` (see `sage llm --help`)")
    # SAGE dispatches plugins through `_handler`; `func` serves parsers that call `args.func(args)` instead
    parser.set_defaults(_handler=run_from_sage, func=run_from_sage)


def llm_args_from(args: Any, argv: list[str] | None = None) -> list[str]:
    """Everything after `llm` on the command line.

    argparse splits it: words that look like options before the first positional (`sage llm --help`) land in
    `parse_known_args`'s unknown list, which SAGE does not pass to plugins. So take the words after the `llm`
    subcommand from the real command line, and fall back to what argparse collected.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    collected = list(getattr(args, "llm_args", None) or [])
    for i, word in enumerate(argv):
        if word != "llm":
            continue
        prev = argv[i - 1] if i else ""
        if prev.startswith("-") and "=" not in prev:  # `--trace-dir llm`: the value of an option, not the command
            continue
        rest = argv[i + 1:]
        if rest[len(rest) - len(collected):] == collected or not collected:
            return rest
    return collected


def run_from_sage(args: Any = None, *_: Any) -> int:
    """Handler for `sage llm ...` under SAGE's CLI: run our Typer app and exit with its code."""
    from sage_llm.cli.main import run

    code = run(llm_args_from(args), "sage llm")
    sys.stdout.flush()
    raise SystemExit(code)


def sage_cli_available() -> bool:
    """True when SAGE's CLI is installed: `sage.cli.main` is importable (checked without importing it) and an installed
    distribution declares the console script `sage = sage.cli.main:main`, as `isage` does. The second check keeps
    another package that happens to be called `sage` (SageMath) from receiving our commands."""
    try:
        if importlib.util.find_spec(SAGE_MODULE) is None:
            return False
    except (ImportError, ValueError):
        return False
    from importlib.metadata import entry_points

    return any(ep.value.replace(" ", "") == f"{SAGE_MODULE}:main"
               for ep in entry_points(group="console_scripts", name="sage"))


def delegate_to_sage(argv: list[str]) -> int | None:
    """Run `sage ARGV` with SAGE's own CLI if it is installed; None when it is not (or cannot be loaded)."""
    if not sage_cli_available():
        return None
    try:
        mod = importlib.import_module(SAGE_MODULE)
    except Exception as exc:  # a broken SAGE install must not break `sage llm`
        sys.stderr.write(f"Warning: SAGE's CLI ({SAGE_MODULE}) is installed but failed to import: {exc}\n")
        return None
    entry = getattr(mod, "main", None)
    if entry is None:
        return None
    old = sys.argv
    sys.argv = ["sage", *argv]
    try:
        rv = entry()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    return rv if isinstance(rv, int) else 0
