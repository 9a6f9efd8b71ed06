"""Fitting into SAGE's own argparse `sage` command (package `isage`, module `sage.cli.main`).

* `register(subparsers)` is our entry point in the `sage.cli.plugins` group: it adds an `llm` subcommand that hands
  everything after `sage llm` to our Typer app.
* `delegate_to_sage(argv)`: when our `sage` script runs a subcommand other than `llm` and SAGE's CLI is importable,
  hand it over, so installing both never breaks `sage status` or `sage studio`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("llm", help="Run and watch local vLLM inference engines (sage-llm).",
                                   add_help=False)
    parser.add_argument("llm_args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_run_from_sage, handler=_run_from_sage)


def _run_from_sage(args: Any = None, *rest: Any) -> int:
    from sage_llm.cli.main import run

    llm_args = list(getattr(args, "llm_args", None) or [])
    code = run(llm_args, "sage llm")
    sys.exit(code)


def delegate_to_sage(argv: list[str]) -> int | None:
    """Run `sage ARGV` with SAGE's own CLI if it is installed; None when it is not."""
    try:
        mod = importlib.import_module("sage.cli.main")
    except Exception:
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
