"""The `llm` command group. Import `llm_app` to mount it in another Typer app with `add_typer(llm_app, name="llm")`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer
import typer.main
from typer.core import TyperGroup

if TYPE_CHECKING:
    from typer._click.core import Command  # Typer's vendored Click (typer is pinned below 0.30)

from sage_llm import __version__
from sage_llm.cli._options import EXIT_CODES_EPILOG

ENV_EPILOG = (
    "Environment: SAGE_LLM_HOME (state directory), SAGE_LLM_VLLM (command that runs vLLM), "
    "SAGE_LOCAL_ENGINE_PORT (8001), SAGE_LOCAL_ENGINE_DEFAULT_MODEL (Qwen/Qwen2.5-7B-Instruct), "
    "SAGE_LOCAL_ENGINE_GPU_UTIL (0.9), SAGE_LLM_DEBUG=1 (tracebacks). Settings: flag > environment > ./.env "
    "(SAGE_* keys) > config file (SAGE_LLM_CONFIG, default ~/.config/sage/llm.toml) > default; see "
    "`sage-llm config show`. " + EXIT_CODES_EPILOG
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sage-llm {__version__}")
        raise typer.Exit()


# name: (module in sage_llm.cli.commands, its command function or Typer sub-app), in the order `--help` lists them
# (Typer's: commands, then groups)
COMMANDS: dict[str, tuple[str, str]] = {
    "start": ("start", "start"),
    "stop": ("stop", "stop"),
    "status": ("status", "status"),
    "chat": ("chat", "chat"),
    "restart": ("restart", "restart"),
    "switch": ("switch", "switch"),
    "bench": ("bench", "bench"),
    "doctor": ("doctor", "doctor"),
    "top": ("top", "top"),
    "logs": ("logs", "logs"),
    "run": ("run", "run"),
    "engine": ("engine", "engine_app"),
    "config": ("config", "config_app"),
    "models": ("models", "models_app"),
    "gateway": ("gateway", "gateway_app"),
}


class LazyGroup(TyperGroup):
    """The `llm` group, which imports a command's module only when that command is looked up: a run imports the one
    command it runs (importing all 15 modules cost ~40% of `status`'s start-up); `--help`, completion and the docs
    generator list every command and so load them all. `on_load` sees each command once it is built (main.py renames
    its help texts to the program name the user typed)."""

    on_load: Callable[[Command], None] | None = None

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.commands[cmd_name] = cmd = load(cmd_name)
            if self.on_load is not None:
                self.on_load(cmd)
        return self.commands.get(cmd_name)


def load(name: str) -> Command:
    """The click command `name`, built by Typer exactly as if registered on `llm_app` (same markup mode, epilog)."""
    import importlib

    module_name, attr = COMMANDS[name]
    module = importlib.import_module(f"sage_llm.cli.commands.{module_name}")
    obj = getattr(module, attr)
    holder = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False)
    if isinstance(obj, typer.Typer):
        holder.add_typer(obj, name=name)
    else:
        holder.command(name, epilog=module.EPILOG)(obj)
    group = typer.main.get_group(holder)
    return group.commands[name]


llm_app = typer.Typer(
    name="llm",
    cls=LazyGroup,
    help="Run and watch local vLLM inference engines.",
    epilog=ENV_EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@llm_app.callback()
def llm_root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")]
    = False,
) -> None:
    """Run and watch local vLLM inference engines."""
