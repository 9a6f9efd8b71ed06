"""`status` without Typer: Studio and scripts poll it (budgets: `status --json` 4x `python -c pass`, the table 1.5x
`import typer, rich.console, rich.table`; docs/benchmarks.md). `cli/main.py` sends the plain forms here
(`status [NAME|PORT] [--json] [-q]`); the Typer command (`commands/status.py`: help, completion, anything else) calls
the same `status()`. Typer alone (with the pydantic it imports to build a command) is more than the table's budget.
Rich is imported only to draw the table."""

from __future__ import annotations

STATE_STYLE = {"ready": "green", "starting": "yellow", "unhealthy": "red", "failed": "bold red", "stopped": "dim"}
FLAGS = {"--json": "json_", "-q": "quiet", "--quiet": "quiet"}


def plain_args(args: list[str]) -> dict[str, object] | None:
    """`status`'s arguments as keywords of `status()` when `args` is a plain `status` invocation, else None."""
    if not args or args[0] != "status":
        return None
    kw: dict[str, object] = {"target": None, "json_": False, "quiet": False}
    for a in args[1:]:
        if a in FLAGS:
            kw[FLAGS[a]] = True
        elif a.startswith("-") or kw["target"] is not None:
            return None  # --help, an unknown option, a second target: Typer answers
        else:
            kw["target"] = a
    return kw


def status(target: str | None = None, json_: bool = False, quiet: bool = False) -> int:
    """The `status` command: the JSON document, the names (-q) or the table; exit 3 when TARGET is not ready."""
    from sage_llm.cli import _output as out
    from sage_llm.engine.status import build
    from sage_llm.engine.view import human_uptime

    doc, views, warnings = build(target)  # errors: the caller's (main.run, or Typer's _run_typer)
    for w in warnings:
        out.warning(w)
    if json_:
        out.print_json(doc)
    elif quiet:
        for v in views:
            if v.name and v.managed:  # names other commands accept: `sage-llm stop $(sage-llm status -q)`
                out.result(v.name)
    else:
        if not views:
            if target is None:
                out.info("no engines. Start one: sage-llm start MODEL")
        else:
            from rich.table import Table
            from rich.text import Text

            table = Table(box=None, pad_edge=False, header_style="bold")
            show_gpu = bool(doc["gpus"])
            cols = ["NAME", "STATE", "MODEL", "PORT", "PID", "UPTIME", "BASE URL"] + (["GPU MEM"] if show_gpu else [])
            for c in cols:
                table.add_column(c, overflow="fold")
            for v in views:
                label = v.state + ("" if v.managed else " (external)")
                if v.state == "starting" and v.stage:
                    from sage_llm.observe.progress import LABELS

                    label += f": {LABELS.get(v.stage, v.stage)}" + (f" {v.progress:.0%}" if v.progress is not None
                                                                     else "")
                state = Text(label, style=STATE_STYLE.get(v.state, ""))
                row = [v.name or "-", state, v.served_model_name or v.model or "-", str(v.port or "-"),
                       str(v.pid or "-"), human_uptime(v.uptime_s) or "-", v.base_url or "-"]
                if show_gpu:
                    row.append(_gpu_cell(v))
                table.add_row(*row)
            out.console().print(table)
            for v in views:
                if v.error:
                    out.info(f"{v.name}: {v.error}")
            for v in views:
                if v.ray is not None:
                    from sage_llm.engine.ray_cluster import describe

                    out.result(f"{v.name}: {describe(v.ray)}")
                if v.cluster is not None:
                    from sage_llm.engine.cluster import describe_view

                    out.result(f"{v.name}: {describe_view(v.cluster)}")
            from sage_llm.observe.gpu import NO_DRIVER

            if doc["gpu_error"] and doc["gpu_error"] != NO_DRIVER:
                out.info(f"GPU: {doc['gpu_error']}")
        gw = doc.get("gateway")
        if gw is not None and target is None:
            out.info(f"gateway: {gw['url']} (pid {gw['pid']})" if gw["running"] else
                     f"gateway: not running (stale record, pid {gw['pid']}; `sage-llm gateway stop` clears it)")
    if target is not None:
        from sage_llm import api

        if not views:
            out.error(f"no engine named or on port {target!r}", "see `sage-llm status`")
        if api.not_ready(views):
            return 3
    return 0


def _gpu_cell(v: object) -> str:
    """"22.0 GiB on 0,1": the engine's VRAM summed over its processes, and the GPUs it holds or was placed on."""
    mem = getattr(v, "gpu_memory_bytes", None)
    where = ",".join(str(g.get("index")) for g in getattr(v, "gpus", []) or [])
    from sage_llm.cli import _output as out

    text = out.human_bytes(mem) if mem is not None else "-"
    return f"{text} on {where}" if where else text
