"""`sage-llm restart NAME [--model M] [start options]`: stop and start again, every recorded setting kept."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sage_llm.api import LaunchOverrides  # at run time: the signature's annotations are resolved (cli/_launch.py)
from sage_llm.cli import _complete
from sage_llm.cli import _output as out
from sage_llm.cli._launch import ExtraArg, launch_options
from sage_llm.cli._options import JsonOpt

EPILOG = ("Examples: sage-llm restart qwen | sage-llm restart qwen --max-model-len 8192 | "
          "sage-llm restart qwen --model Qwen/Qwen2.5-3B-Instruct | sage-llm restart qwen -- --enable-prefix-caching")

def print_result(result: Any, json_: bool, verb: str) -> None:
    rec = result.record
    for w in result.warnings:
        out.warning(w)
    if result.port_note:
        out.info(result.port_note)
    stop = result.stop
    if stop is not None:
        for note in stop.notes:
            out.warning(note)
    if json_:
        out.print_json(result.to_json())
    else:
        for key, (before, after) in result.changed.items():
            out.info(f"  {key}: {before!r} -> {after!r}")
        took = f" in {result.ready_after_s:.1f} s" if result.ready_after_s is not None else ""
        out.result(f"engine {rec.name!r} {verb}{took}: {rec.served_model_name} at {rec.base_url} (pid {rec.pid})")
    if stop is not None and not stop.stopped:
        out.error(f"the previous engine did not stop: {stop.message}",
                  f"inspect with `sage-llm status`; retry `sage-llm stop {stop.name}`")
        raise typer.Exit(1)


@launch_options("override")
def restart(
    launch: LaunchOverrides,
    name: Annotated[str, typer.Argument(help="Engine name.", show_default=False,
                                        autocompletion=_complete.engine_names)],
    vllm_args: ExtraArg = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Serve another model (default: the same).")]
    = None,
    timeout: float | None = None,
    gpus: str | None = None,
    json_: JsonOpt = False,
) -> None:
    """Stop an engine and start it again with every recorded setting, except the ones given here.

    Every check `start` makes runs before the engine is stopped; the port stays the same unless --port is given.
    """
    from sage_llm import api
    from sage_llm.cli._progress import LoadDisplay

    launch.model = model
    progress = LoadDisplay(enabled=True)
    try:
        result = api.restart(name, launch, gpus=gpus, timeout=timeout, on_progress=progress.update)
    finally:
        progress.close()
    print_result(result, json_, "restarted")
