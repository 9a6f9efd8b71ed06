"""`sage-llm status`: every engine, managed or not, probed in parallel."""

from __future__ import annotations

from typing import Annotated

import typer

from sage_llm.cli import _complete
from sage_llm.cli._options import EXIT_CODES_EPILOG, JsonOpt

EPILOG = ("Examples: sage-llm status | sage-llm status --json | sage-llm status qwen && echo ready | "
          "sage-llm stop $(sage-llm status -q). " + EXIT_CODES_EPILOG)


def status(
    target: Annotated[str | None, typer.Argument(help="Engine name or port.", show_default=False,
                                                          autocompletion=_complete.engines)] = None,
    json_: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print the names of managed engines only, one per "
                                        "line.")] = False,
) -> None:
    """Show engines: state (starting, ready, unhealthy, failed, stopped), model, port, pid, uptime, base URL.

    With NAME or PORT, exit 3 unless that engine is ready.
    """
    from sage_llm.cli.fast_status import status as run_status

    code = run_status(target, json_, quiet)
    if code:
        raise typer.Exit(code)
