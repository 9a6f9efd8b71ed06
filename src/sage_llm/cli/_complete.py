"""Shell-completion callbacks (`autocompletion=` on arguments).

They read only the engine records in the state directory and the Hugging Face cache's directory listing: no HTTP,
no NVML, no huggingface_hub, no psutil. So a TAB answers in a few milliseconds after Python and Typer have loaded
(budget: 100 ms for the callback; see docs/benchmarks.md). They never raise: a broken state directory completes
nothing rather than printing a traceback into the shell.

Use:  typer.Argument(..., autocompletion=_complete.engines)       engine names and ports (stop, status, logs, chat)
      typer.Argument(..., autocompletion=_complete.cached_models) model ids in the HF cache (start, models rm)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

Item = tuple[str, str]  # (value, help shown by zsh and fish)


def _records() -> Iterator[dict]:
    from sage_llm.core import paths

    try:
        folder = paths.engines_dir()
        entries = sorted(os.listdir(folder))
    except (OSError, ValueError):
        return
    for entry in entries:
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        try:
            with open(os.path.join(folder, entry), encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            yield data


def engines(incomplete: str = "") -> list[Item]:
    """Names of recorded engines, then their ports, that start with `incomplete`."""
    try:
        names: list[Item] = []
        ports: list[Item] = []
        for rec in _records():
            model = rec.get("served_model_name") or rec.get("model") or "?"
            port = rec.get("port")
            names.append((rec["name"], f"{model} on port {port}"))
            if isinstance(port, int):
                ports.append((str(port), f"engine {rec['name']} ({model})"))
        return [i for i in names + ports if i[0].startswith(incomplete)]
    except Exception:
        return []


def engine_names(incomplete: str = "") -> list[Item]:
    """Names of recorded engines only (for arguments that take no port)."""
    return [i for i in engines(incomplete) if not i[0].isdigit()]


def cached_models(incomplete: str = "") -> list[Item]:
    """Model repo ids in the Hugging Face cache (from the directory listing only)."""
    try:
        from sage_llm.models.hf_cache import cached_repo_ids

        return [(r, "in the Hugging Face cache") for r in cached_repo_ids() if r.startswith(incomplete)]
    except Exception:
        return []


def setting_keys(incomplete: str = "") -> list[Item]:
    """Setting names for `config set/unset`."""
    from sage_llm.core.settings import SETTINGS

    return [(s.key, s.help) for s in SETTINGS if s.key.startswith(incomplete)]
