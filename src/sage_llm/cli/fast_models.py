"""`models [list] --json` without Typer or Rich: Typer 0.29 imports pydantic (0.3-0.8 s here), more than the whole
budget of listing a 200-repo cache (300 ms)."""

from __future__ import annotations

import json
import sys

FAST_FORMS = (["models", "--json"], ["models", "list", "--json"], ["models", "--json", "list"])


def is_fast(args: list[str]) -> bool:
    return args in FAST_FORMS


def models_json() -> int:
    from sage_llm.core.errors import SageLLMError
    from sage_llm.engine.catalog import local_models
    from sage_llm.models import hf_cache

    try:
        models, warnings = local_models()
    except SageLLMError as exc:
        sys.stderr.write(f"Error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else "") + "\n")
        return exc.exit_code
    for w in warnings:
        sys.stderr.write(f"Warning: {w}\n")
    doc = {"cache_dir": str(hf_cache.hub_cache_dir()), "models": [m.to_json() for m in models]}
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()
    return 0
