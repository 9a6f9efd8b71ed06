"""Reading engine logs without a `tail` subprocess: last N lines by seeking from the end."""

from __future__ import annotations

import os
import re
from pathlib import Path

LINE_SPLIT = re.compile(r"\r\n|\r|\n")  # vLLM's CUDA-graph bar redraws with \r


def tail_lines(path: str | Path, n: int = 20, block: int = 64 * 1024) -> list[str]:
    """The last `n` non-empty lines of a file (split on \\n and \\r), reading only the end of it."""
    if n <= 0:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            data = b""
            pos = end
            while pos > 0:
                step = min(block, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
                if len([ln for ln in LINE_SPLIT.split(data.decode("utf-8", "replace")) if ln.strip()]) > n:
                    break
    except OSError:
        return []
    lines = [ln for ln in LINE_SPLIT.split(data.decode("utf-8", "replace")) if ln.strip()]
    if pos > 0 and lines:
        lines = lines[1:]  # the first piece may be a partial line
    return lines[-n:]


def last_line(path: str | Path) -> str | None:
    lines = tail_lines(path, 1, block=8 * 1024)
    return lines[-1] if lines else None


def run_lines(path: str | Path, max_bytes: int = 2 * 1024 * 1024) -> list[str]:
    """The non-empty lines of the engine's latest run (after the last `sage llm start` header), at most the last
    `max_bytes` of it: what failure diagnosis reads, so a root cause far above the last 200 lines is still seen."""
    from sage_llm.progress import find_run_start

    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            start = max(find_run_start(Path(path)), end - max_bytes)
            fh.seek(start)
            data = fh.read(end - start)
    except OSError:
        return []
    return [ln for ln in LINE_SPLIT.split(data.decode("utf-8", "replace")) if ln.strip()]
