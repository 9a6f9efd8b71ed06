"""`status [NAME|PORT] --json` without Typer or Rich: Studio polls this, so it must stay cheap."""

from __future__ import annotations

import json
import sys


def status_json(target: str | None) -> int:
    from sage_llm.cli import _output as out
    from sage_llm.core.errors import SageLLMError
    from sage_llm.engine.status import build

    try:
        doc, views, warnings = build(target)
    except SageLLMError as exc:
        out.error(exc.message, exc.hint)
        return exc.exit_code
    for w in warnings:
        out.warning(w)
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()
    if target is not None:
        from sage_llm.api import not_ready

        if not views:
            out.error(f"no engine named or on port {target!r}", "see `sage-llm status`")
        if not_ready(views):
            return 3
    return 0
