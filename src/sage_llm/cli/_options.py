"""Shared parameter aliases, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="Print engine names only, one per line.")]
YesOpt = Annotated[bool, typer.Option("-y", "--yes", help="Do not ask for confirmation.")]

EXIT_CODES_EPILOG = (
    "Exit codes: 0 ok; 1 operational failure (engine failed, something survived a stop); "
    "2 bad input (nothing was changed); 3 `status NAME`: engine not ready or unknown."
)
