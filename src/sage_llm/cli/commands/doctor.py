"""`sage-llm doctor`: one line per check (ok / warn / fail) with the fix; exit 1 when something fails."""

from __future__ import annotations

import typer

from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

EPILOG = ("Checks: settings, engine environment and vLLM version, NVML and driver, GPUs and free memory, default "
          "port, HF cache and free disk, state directory, HF_HUB_OFFLINE and token (never printed), the commands' "
          "name under SAGE's `sage`. "
          "Exit 0 when nothing fails (warnings allowed), 1 otherwise. "
          "Examples: sage-llm doctor | sage-llm doctor --json | sage-llm doctor || sage-llm engine install")


def doctor(json_: JsonOpt = False) -> None:
    """Check what breaks starts: each line ok, warn or fail, with the fix."""
    from sage_llm import doctor as core

    def show(c: core.Check) -> None:
        if json_:
            return
        out.result(f"{c.status:<4}  {out.named(c.message)}")  # our commands, spelled as the user typed them
        if c.fix and c.status != core.OK:
            out.result(f"      fix: {out.named(c.fix)}")

    checks = core.run_checks(on_check=show)
    counts = core.summary(checks)
    if json_:
        out.print_json({"ok": counts[core.FAIL] == 0, "summary": counts, "checks": [c.to_json() for c in checks]})
    else:
        out.info(f"{counts[core.OK]} ok, {counts[core.WARN]} warning(s), {counts[core.FAIL]} failure(s)")
    if counts[core.FAIL]:
        raise typer.Exit(1)
