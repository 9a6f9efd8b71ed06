"""The root `sage` Typer app. It mounts the `llm` group; a larger `sage` CLI can mount `llm_app` the same way."""

from __future__ import annotations

from typing import Annotated

import typer

from sage_llm import __version__
from sage_llm.cli.llm import llm_app


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sage-llm {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="sage",
    help="SAGE command line (this install provides the `llm` group).",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")]
    = False,
) -> None:
    """SAGE command line."""


app.add_typer(llm_app, name="llm")
