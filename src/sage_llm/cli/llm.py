"""The `llm` command group. Import `llm_app` to mount it in another Typer app with `add_typer(llm_app, name="llm")`."""

from __future__ import annotations

from typing import Annotated

import typer

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


llm_app = typer.Typer(
    name="llm",
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


def _register() -> None:
    from sage_llm.cli.commands import chat, engine, start, status, stop

    llm_app.command("start", epilog=start.EPILOG)(start.start)
    llm_app.command("stop", epilog=stop.EPILOG)(stop.stop)
    llm_app.command("status", epilog=status.EPILOG)(status.status)
    llm_app.command("chat", epilog=chat.EPILOG)(chat.chat)
    llm_app.add_typer(engine.engine_app, name="engine")
    from sage_llm.cli.commands import bench, restart, switch

    llm_app.command("restart", epilog=restart.EPILOG)(restart.restart)
    llm_app.command("switch", epilog=switch.EPILOG)(switch.switch)
    llm_app.command("bench", epilog=bench.EPILOG)(bench.bench)
    from sage_llm.cli.commands import config

    llm_app.add_typer(config.config_app, name="config")
    from sage_llm.cli.commands import doctor

    llm_app.command("doctor", epilog=doctor.EPILOG)(doctor.doctor)
    from sage_llm.cli.commands import models

    llm_app.add_typer(models.models_app, name="models")
    from sage_llm.cli.commands import top

    llm_app.command("top", epilog=top.EPILOG)(top.top)

    from sage_llm.cli.commands import logs

    llm_app.command("logs", epilog=logs.EPILOG)(logs.logs)
    from sage_llm.cli.commands import run

    llm_app.command("run", epilog=run.EPILOG)(run.run)
    from sage_llm.cli.commands import gateway

    llm_app.add_typer(gateway.gateway_app, name="gateway")


_register()
