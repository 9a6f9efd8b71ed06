"""`sage-llm stop`: SIGTERM the engine's process group, wait, SIGKILL what is left, confirm nothing survives."""

from __future__ import annotations

from typing import Annotated

import typer

from sage_llm.cli import _complete
from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

EPILOG = "Examples: sage-llm stop qwen2.5-7b-instruct | sage-llm stop 8001 | sage-llm stop --all | " \
         "sage-llm stop NAME --force"


def stop(
    targets: Annotated[list[str] | None, typer.Argument(help="Engine names or ports.", show_default=False,
                                                           autocompletion=_complete.engines)] = None,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Stop every engine this tool started.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to wait after SIGTERM before SIGKILL "
                                                  "(default: $SAGE_LLM_STOP_TIMEOUT or 30).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="SIGKILL at once (no grace period); also removes a "
                                        "corrupt record.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Stop engines. Exit 0 when stopped or already gone, 1 when a process survived (it is named)."""
    from sage_llm import api
    from sage_llm.core.errors import UsageError
    from sage_llm.core.state import StateStore

    store = StateStore()
    names = api.resolve_many(list(targets or []), all_, store)
    grace = api.stop_grace(timeout)
    if not names:
        if json_:
            out.print_json({"stopped": []})
        else:
            out.info("no engines to stop")
        return
    outcomes = []
    failed = False
    refused: list[UsageError] = []  # e.g. a record from a newer sage-llm: the others are still stopped
    for name in names:
        try:
            outcome = api.stop(name, timeout=grace, force=force, store=store,
                               on_escalate=lambda n: out.info(f"{n}: still running after {grace:g} s; sending "
                                                              "SIGKILL"))
        except UsageError as exc:
            if len(names) == 1:
                raise
            refused.append(exc)
            continue
        outcomes.append(outcome)
        if not outcome.stopped:
            failed = True
            out.error(outcome.message, f"inspect with `ps -o pid,stat,cmd -p {outcome.survivors[0][0]}`")
        elif not json_:
            out.result(outcome.message)
        for note in outcome.notes:
            out.warning(note)
        if outcome.shm_removed and not json_:
            out.info(f"{name}: removed {len(outcome.shm_removed)} leftover shared-memory file(s) from /dev/shm")
    if json_:
        out.print_json({"stopped": [
            {"name": o.name, "stopped": o.stopped, "already_gone": o.already_gone, "escalated": o.escalated,
             "survivors": [{"pid": p, "name": n} for p, n in o.survivors], "duration_s": round(o.duration_s, 3),
             "port_free": o.port_free, "message": o.message, "shm_removed": o.shm_removed, "notes": o.notes}
            for o in outcomes]})
    for exc in refused[1:]:
        out.error(exc.message, exc.hint)
    if refused:
        raise refused[0]
    if failed:
        raise typer.Exit(1)
