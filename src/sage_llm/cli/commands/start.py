"""`sage-llm start`: launch `vllm serve` detached and wait until it serves the model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from sage_llm.api import LaunchRequest  # at run time: the signature's annotations are resolved (cli/_launch.py)
from sage_llm.cli import _output as out
from sage_llm.cli._launch import ExtraArg, ModelArg, launch_options
from sage_llm.cli._options import JsonOpt

if TYPE_CHECKING:
    from collections.abc import Callable


EPILOG = (
    "Examples: sage-llm start Qwen/Qwen2.5-1.5B-Instruct | "
    "sage-llm start ./my-model --name mine --port 8010 --max-model-len 4096 | "
    "sage-llm start Qwen/Qwen2.5-7B-Instruct-AWQ -q awq -- --enable-prefix-caching | "
    "sage-llm start MODEL --no-wait && sage-llm status MODEL-NAME"
)


@launch_options("start")
def start(
    launch: LaunchRequest,
    model: ModelArg = None,
    vllm_args: ExtraArg = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the engine serves the model.")] = True,
    json_: JsonOpt = False,
) -> None:
    """Start a vLLM engine in the background (its own process group), recorded in the state directory.

    Ctrl-C while waiting stops the waiting, not the engine: it goes on loading in the background.
    """
    launch.wait = wait
    try:
        result = launch_and_show(launch)
    except KeyboardInterrupt:
        out.info("stopped waiting; the engine goes on starting in the background: `sage-llm status` shows it, "
                 "`sage-llm stop NAME` stops it")
        raise typer.Exit(130) from None
    rec = result.record
    if json_:
        out.print_json({"name": rec.name, "state": "ready" if wait else "starting", "already_running":
                        result.already_running, "model": rec.model, "served_model_name": rec.served_model_name,
                        "host": rec.host, "port": rec.port, "base_url": rec.base_url, "pid": rec.pid,
                        "log_file": rec.log_file, "ready_after_s": result.ready_after_s, "gpus": rec.gpus,
                        "dtype": rec.dtype, "max_model_len": rec.max_model_len})
        return
    where = f"pid {rec.pid}"
    if rec.cluster:
        where = f"pid {rec.cluster.get('pid')} on node {rec.cluster.get('node_ip') or '?'}"
    if result.already_running:
        out.result(f"engine {rec.name!r} already serves {rec.served_model_name} at {rec.base_url} ({where})")
        return
    if wait:
        took = f" in {result.ready_after_s:.1f} s" if result.ready_after_s is not None else ""
        out.result(f"engine {rec.name!r} ready{took}: {rec.served_model_name} at {rec.base_url} ({where})")
        out.hint(f"chat: sage-llm chat {rec.name} | logs: sage-llm logs {rec.name} -f | stop: sage-llm stop {rec.name}")
    else:
        out.result(f"engine {rec.name!r} starting: {rec.served_model_name} on {rec.base_url} ({where})")
        out.hint(f"check with `sage-llm status {rec.name}` (exit 0 once ready); log: {rec.log_file}")


def launch_and_show(request: LaunchRequest, foreground: bool = False,
                    checkpoint: Callable[[], None] | None = None) -> Any:
    """`start` and `run`: resolve and check through sage_llm.api, launch with the load display, print the notes that
    follow a launch. Returns api.start's StartResult.

    `checkpoint` is called with every progress update while the engine loads (`run`: raises on a received signal)."""
    from sage_llm import api
    from sage_llm.cli._progress import LoadDisplay
    from sage_llm.cli.commands.models import StartNote, announce_start

    launch = api.resolve_launch(request)  # bad input: exit 2, before anything runs
    # offline + not cached: exit 2 (a cluster engine reads its model on its node: nothing to check here)
    checked = None if launch.cluster else api.preflight(launch.spec.model, launch.spec.download_dir)
    note = announce_start(checked) if checked is not None else StartNote(None)
    progress = LoadDisplay(enabled=launch.wait)
    update = note.wrap(progress.update)
    on_progress = update if checkpoint is None else (lambda ev: (checkpoint(), update(ev)))
    try:
        result = api.start(launch, on_progress=on_progress, foreground=foreground, checked=checked)
    finally:
        progress.close()
    note.flush()  # "cached" / "will download N GiB", if no progress update printed it
    for w in result.warnings:
        out.warning(w)
    if result.port_note:
        out.info(result.port_note)
    if result.dtype_note and not result.already_running:
        out.info(result.dtype_note)
    if result.context_note and not result.already_running:
        out.info(result.context_note)
    rec = result.record
    if rec.gpus and not result.already_running:
        how = {"auto": " (most free memory)", "environment": " (from CUDA_VISIBLE_DEVICES)"}
        out.info(f"GPU: {','.join(str(g['index']) for g in rec.gpus)}{how.get(rec.gpus[0].get('chosen_by'), '')}")
    return result
