"""`sage-llm config show | path | set | unset`: the effective settings and where each comes from."""

from __future__ import annotations

from typing import Annotated

import typer

from sage_llm.cli import _complete
from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

EPILOG = ("Order: flag > environment variable > ./.env (SAGE_* keys only) > config file > built-in default. "
          "Examples: sage-llm config show | sage-llm config show --json | "
          "sage-llm config set local_engine_port 8010 | sage-llm config unset gpu_util | "
          "$EDITOR \"$(sage-llm config path)\"")

config_app = typer.Typer(help="Show and change settings (port, default model, GPU share, timeouts, chat source).",
                         no_args_is_help=True, rich_markup_mode=None, epilog=EPILOG,
                         context_settings={"help_option_names": ["-h", "--help"]})

KeyArg = Annotated[str, typer.Argument(
    metavar="KEY", help="Setting name (see `sage-llm config show`), or its variable name.",
    autocompletion=_complete.setting_keys, show_default=False)]


def _shown(r: object) -> object:
    from sage_llm.core.settings import Resolved

    assert isinstance(r, Resolved)
    if r.spec.secret:
        return "set" if r.value is not None or r.error else "unset"
    return r.value


@config_app.command("show")
def config_show(json_: JsonOpt = False) -> None:
    """Every setting: its effective value, where it came from, and its variable. Secrets show only as set/unset."""
    from sage_llm.core import settings

    resolved, warnings = settings.resolve_all()
    dot = settings.dotenv_path()
    cfg = settings.config_path()
    for w in warnings:
        out.warning(w)
    if json_:
        out.print_json({
            "config_file": str(cfg), "config_file_exists": cfg.is_file(),
            "dotenv_file": str(dot) if dot else None, "dotenv_file_exists": bool(dot and dot.is_file()),
            "settings": {r.key: {"value": None if r.spec.secret else r.value,
                                 "is_set": r.value is not None or r.error is not None,
                                 "source": r.source, "origin": r.origin, "env_var": r.spec.env,
                                 "default": None if r.spec.secret else r.spec.default, "secret": r.spec.secret,
                                 "error": r.error} for r in resolved},
        })
        if any(r.error for r in resolved):
            raise typer.Exit(2)
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("KEY", "VALUE", "SOURCE", "VARIABLE"):
        table.add_column(col, overflow="fold")
    for r in resolved:
        value = "-" if _shown(r) is None else str(_shown(r))
        if r.error:
            value = f"INVALID ({r.error})"
        table.add_row(r.key, value, r.where(), r.spec.env)
    out.console().print(table)
    out.info(f"config file: {cfg}{'' if cfg.is_file() else ' (not created yet)'}")
    if dot is not None:
        out.info(f".env: {dot}{'' if dot.is_file() else ' (none)'}")
    bad = [r for r in resolved if r.error]
    if bad:
        out.hint(f"fix {bad[0].where()}, or `sage-llm config set {bad[0].key} VALUE`")
        raise typer.Exit(2)


@config_app.command("path")
def config_path() -> None:
    """Print the config file's path (it may not exist yet)."""
    from sage_llm.core import settings

    out.result(str(settings.config_path()))


@config_app.command("set")
def config_set(
    key: KeyArg,
    value: Annotated[str, typer.Argument(metavar="VALUE", help="The new value (checked before anything is written); "
                                         "`-` reads it from stdin, which keeps a secret out of the shell history.",
                                         show_default=False)],
) -> None:
    """Validate VALUE and store it in the config file (written atomically, mode 0600)."""
    import sys

    from sage_llm.core import settings

    if value == "-":
        value = sys.stdin.readline().rstrip("\r\n")

    spec, parsed, path = settings.set_value(key, value)
    shown = "(secret)" if spec.secret else repr(parsed)
    out.result(f"{spec.key} = {shown} written to {path}")
    winner = settings.resolve(spec.key)
    if winner.source in ("env", "dotenv"):
        out.warning(f"{winner.where()} still overrides it")


@config_app.command("unset")
def config_unset(key: KeyArg) -> None:
    """Remove a setting from the config file (back to the environment, .env or the default)."""
    from sage_llm.core import settings

    spec, present, path = settings.unset_value(key)
    out.result(f"{spec.key} removed from {path}" if present else f"{spec.key} was not set in {path}")
