"""Reading the end of a text file without reading all of it: engine logs (observe/logs.py) and the audit log."""

from __future__ import annotations

import os
import re
from pathlib import Path

LINE_SPLIT = re.compile(r"\r\n|\r|\n")  # vLLM's CUDA-graph bar redraws with \r
BLOCK = 64 * 1024


def tail_lines(path: str | Path, n: int = 20, block: int = BLOCK) -> list[str]:
    """The last `n` non-empty lines of a file (split on \\n and \\r), reading only the end of it."""
    if n <= 0:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            pos = fh.tell()
            chunks: list[bytes] = []
            seps = 0
            while pos > 0 and seps <= n:
                step = min(block, pos)
                pos -= step
                fh.seek(pos)
                chunk = fh.read(step)
                chunks.append(chunk)
                seps += chunk.count(b"\n") + chunk.count(b"\r")
    except OSError:
        return []
    data = b"".join(reversed(chunks))
    lines = [ln for ln in LINE_SPLIT.split(data.decode("utf-8", "replace")) if ln.strip()]
    if pos > 0 and lines:
        lines = lines[1:]  # the first piece may be a partial line
    return lines[-n:]
