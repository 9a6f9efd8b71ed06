"""`sage-llm logs`: an engine's log (last lines, --since, -f), or the audit log (--audit)."""

from __future__ import annotations

from typing import Annotated

import typer

from sage_llm.cli import _complete
from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

EPILOG = ("Examples: sage-llm logs | sage-llm logs qwen -n 200 | sage-llm logs 8001 -f | "
          "sage-llm logs qwen --since 10m | sage-llm logs --audit -n 20 --json")


def logs(
    target: Annotated[str | None, typer.Argument(help="Engine name or port (optional with one engine).",
                                                 show_default=False, autocompletion=_complete.engines)] = None,
    lines: Annotated[int | None, typer.Option("-n", "--lines", help="How many of the last lines to show "
                                              "(default 100; with --since, every line since then).",
                                              show_default=False)] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new lines until Ctrl-C or until the "
                                         "engine is stopped.")] = False,
    since: Annotated[str | None, typer.Option("--since", help="Only lines from the last DURATION (30s, 10m, 2h, 1d), "
                                              "by the times vLLM writes on its lines.")] = None,
    audit_: Annotated[bool, typer.Option("--audit", help="Show the audit log of state-changing operations instead.")]
    = False,
    json_: JsonOpt = False,
) -> None:
    """Show an engine's log (stdout and stderr of `vllm serve`), or with --audit the audit log."""
    from sage_llm.core.errors import UsageError
    from sage_llm.engine import logtarget
    from sage_llm.observe import logs as core

    if lines is not None and lines < 0:
        raise UsageError(f"-n {lines} must not be negative", hint="e.g. -n 100")
    seconds = None
    if since is not None:
        try:
            seconds = core.parse_duration(since)
        except ValueError:
            raise UsageError(f"--since {since!r} is not a duration", hint="e.g. --since 30s, 10m, 2h or 1d") from None
    if audit_:
        _audit(100 if lines is None else lines, json_, target, follow)
        return
    if json_:
        raise UsageError("--json goes with --audit", hint="engine logs are plain text: sage-llm logs NAME")
    tgt = logtarget.resolve(target)
    if getattr(tgt.record, "cluster", None):
        from sage_llm.engine import cluster

        if follow:
            raise UsageError(f"engine {tgt.name!r} runs on a node of a Ray cluster: -f is not supported for it yet",
                             hint=f"sage-llm logs {tgt.name} -n 200")
        if not cluster.fetch_log(tgt.record, tgt.path):  # type: ignore[arg-type]
            out.info(f"the agent of {tgt.name!r} is gone; showing the copy fetched last ({tgt.path})")
    # with -f the lines shown end after the file's last complete line and the follow goes on from exactly there (as
    # the panel does): a line written in between is shown once, not lost
    offset = core.complete_end(tgt.path) if follow else None
    if seconds is not None:
        shown = core.since(tgt.path, seconds, end=offset)
        if lines is not None:
            shown = shown[-lines:] if lines else []
    else:
        shown = core.tail(tgt.path, 100 if lines is None else lines, offset)
    if not tgt.path.exists():
        out.info(f"engine {tgt.name!r} has no log yet ({tgt.path})")
    for line in shown:
        out.result(line)
    if not follow:
        return
    try:
        out.info(f"following {tgt.path} (Ctrl-C to stop)")  # in the try: a Ctrl-C right after it is clean too
        for ev in core.follow(tgt.path, stop=logtarget.engine_ended(tgt), start_offset=offset):
            if ev.kind == "line":
                out.result(ev.text)
            elif ev.kind == "notice":
                out.info(f"-- {ev.text}")
            else:
                out.info(f"-- {ev.text}; stopped following")
                return
    except KeyboardInterrupt:
        out.info("-- stopped following (Ctrl-C); the engine keeps running")


def _audit(lines: int, json_: bool, target: str | None, follow: bool) -> None:
    from sage_llm.core import audit
    from sage_llm.core.errors import UsageError

    if target is not None or follow:
        raise UsageError("--audit takes neither an engine nor -f", hint="sage-llm logs --audit -n 20")
    entries = audit.read(lines)
    if json_:
        out.print_json({"path": str(audit.path()), "entries": entries})
        return
    if not entries:
        out.info(f"the audit log is empty ({audit.path()})")
        return
    for e in entries:
        args = e.get("args")
        if isinstance(args, dict):
            shown = " ".join(f"{k}={v}" for k, v in args.items() if v not in (None, False, [], {}, ""))
        else:
            shown = str(args)
        res = e.get("result") or {}
        extra = f" -> {res.get('engine')}" if isinstance(res, dict) and res.get("engine") else ""
        err = f": {e['error']}" if e.get("error") else ""
        out.result(f"{e.get('time')}  {e.get('user')}  pid {e.get('pid')}  {e.get('command')}  "
                   f"{e.get('outcome')}{err}  {e.get('duration_s')} s{extra}  [{shown}]")
