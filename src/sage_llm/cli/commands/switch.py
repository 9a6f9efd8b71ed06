"""`sage-llm switch NAME MODEL [--rolling]`: serve another model under the same name, every other setting kept."""

from __future__ import annotations

from typing import Annotated

import typer

from sage_llm.api import LaunchOverrides  # at run time: the signature's annotations are resolved (cli/_launch.py)
from sage_llm.cli import _complete
from sage_llm.cli._launch import ExtraArg, launch_options
from sage_llm.cli._options import JsonOpt
from sage_llm.cli.commands.restart import print_result

EPILOG = ("Examples: sage-llm switch qwen Qwen/Qwen2.5-3B-Instruct | "
          "sage-llm switch qwen Qwen/Qwen2.5-3B-Instruct --rolling && sage-llm status qwen --json | "
          "sage-llm switch qwen ./my-model --max-model-len 4096")


@launch_options("override")
def switch(
    launch: LaunchOverrides,
    name: Annotated[str, typer.Argument(help="Engine name.", show_default=False,
                                        autocompletion=_complete.engine_names)],
    model: Annotated[str, typer.Argument(help="Hugging Face repo id or local path to serve.", show_default=False,
                                         autocompletion=_complete.cached_models)],
    vllm_args: ExtraArg = None,
    rolling: Annotated[bool, typer.Option("--rolling", help="Start the new model on a free port, wait until it "
                                          "serves, then stop the old one; if the new one fails, the old one keeps "
                                          "serving.")] = False,
    timeout: float | None = None,
    gpus: str | None = None,
    json_: JsonOpt = False,
) -> None:
    """Switch an engine to another model; every other recorded setting is kept unless given here.

    Without --rolling the engine restarts in place (same port). With --rolling the new engine takes over the name,
    and `status --json` shows its new port. Every check `start` makes runs before anything is stopped.
    """
    from sage_llm import api
    from sage_llm.cli._progress import LoadDisplay

    progress = LoadDisplay(enabled=True)
    try:
        result = api.switch(name, model, rolling=rolling, overrides=launch, gpus=gpus, timeout=timeout,
                            on_progress=progress.update)
    finally:
        progress.close()
    print_result(result, json_, "switched" + (" (rolling)" if result.rolling else ""))
