"""`status [NAME|PORT] --json` without Typer or Rich: Studio polls this, so it must stay cheap."""

from __future__ import annotations

import json
import sys


def status_json(target: str | None) -> int:
    from sage_llm.errors import SageLLMError
    from sage_llm.status import build

    try:
        doc, views, warnings = build(target)
    except SageLLMError as exc:
        sys.stderr.write(f"Error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else "") + "\n")
        return exc.exit_code
    for w in warnings:
        sys.stderr.write(f"Warning: {w}\n")
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()
    if target is not None:
        from sage_llm.api import not_ready

        if not views:
            sys.stderr.write(f"Error: no engine named or on port {target!r} (hint: see `sage llm status`)\n")
        if not_ready(views):
            return 3
    return 0
