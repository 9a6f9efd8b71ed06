"""Output: results on stdout, everything else (progress, warnings, errors, hints) on stderr.

Rich consoles are built lazily (so CliRunner's swapped streams are the ones used) with markup, emoji and highlighting
off: engine names and log lines with [brackets] are never read as markup.
"""

from __future__ import annotations

import json
import re
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any


_consoles: dict[str, Any] = {}

# The library and the help texts spell our commands `sage-llm ...` (our script's name). What the user typed may be
# `sage vllm` (inside SAGE's `sage`) or `python -m sage_llm`: `named()` is the one place that rewrites the spelling,
# for messages on stderr (error, warning, hint, info) and for help texts (`main.command`). Results on stdout (tables,
# log lines, JSON documents) are data and are never rewritten. Only `sage-llm` followed by a subcommand is a command
# line; `pip install sage-llm`, `sage-llm's`, "`sage-llm ...` works everywhere" name the package or the script.
SPELLED = "sage-llm"
_SPELLED_RE = re.compile(r"(?<![\w./-])sage-llm(?= [a-z-])")
_prog = SPELLED


def set_prog(prog: str) -> None:
    """The program name the user typed; `main.run` sets it first thing."""
    global _prog
    _prog = prog


def named(text: str, prog: str | None = None) -> str:
    """`text` with `sage-llm SUBCOMMAND` spelled as `prog SUBCOMMAND` (default: the program the user typed)."""
    prog = _prog if prog is None else prog
    if prog == SPELLED or SPELLED not in text:
        return text
    return _SPELLED_RE.sub(prog, text)


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    key = f"{'err' if stderr else 'out'}:{id(stream)}"
    if key not in _consoles:
        import os

        width = None
        if not stream.isatty() and not os.environ.get("COLUMNS"):
            width = 200  # piped output: never wrap table cells (URLs, model ids) at 80 columns
        _consoles[key] = Console(file=stream, markup=False, emoji=False, highlight=False, soft_wrap=False,
                                 width=width)
    return _consoles[key]


def reset() -> None:
    global _prog
    _consoles.clear()
    _prog = SPELLED


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def result(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def info(msg: str, raw: bool = False) -> None:
    """A message on stderr; `raw` for quoted text such as log lines, which is never renamed."""
    sys.stderr.write((msg if raw else named(msg)) + "\n")
    sys.stderr.flush()


def warning(msg: str) -> None:
    sys.stderr.write(f"Warning: {named(msg)}\n")
    sys.stderr.flush()


def hint(msg: str) -> None:
    sys.stderr.write(f"Hint: {named(msg)}\n")
    sys.stderr.flush()


def error(msg: str, hint_text: str | None = None) -> None:
    sys.stderr.write(f"Error: {named(msg)}" + (f" (hint: {named(hint_text)})" if hint_text else "") + "\n")
    sys.stderr.flush()


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


def human_ago(ts: float | str | None, now: float | None = None) -> str:
    """'12s ago', '3m ago', '5h ago', '2d ago' for a Unix time or an ISO-8601 string; 'n/a' when unknown."""
    if ts is None:
        return "n/a"
    if isinstance(ts, str):
        from datetime import datetime

        try:
            ts = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return "n/a"
    import time

    delta = max(0.0, (now if now is not None else time.time()) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{int(delta // size)}{unit} ago"
    return f"{int(delta)}s ago"
