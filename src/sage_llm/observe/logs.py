"""Reading engine logs without a `tail` subprocess: last N lines by seeking from the end, `--since`, and follow.

Lines are what a terminal shows: split on \\n, and a line redrawn with \\r (tqdm's CUDA-graph bar) shows its last
drawing. `tail_lines()` (used by diagnosis and progress) splits on \\r as well and drops blank lines.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sage_llm.core.textfiles import BLOCK, LINE_SPLIT, tail_lines

# vLLM: "(APIServer pid=1) INFO 11-25 08:00:22 [file.py:1] msg" (local time, no year); our own start header
_VLLM_TS = re.compile(r"^(?:\S*\([\w-]+ pid=\d+\) )?[A-Z]+ (\d\d)-(\d\d) (\d\d):(\d\d):(\d\d) \[")
_HEADER_TS = re.compile(r"^===== sage llm start \S+ at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:Z|[+-]\d\d:\d\d)?:")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|secs|sec|s|mins|min|m|hrs|hr|h|days|day|d|w)(?![a-z])")
_UNIT_S = {"ms": 0.001, "s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60, "h": 3600, "hr": 3600,
           "hrs": 3600, "d": 86400, "day": 86400, "days": 86400, "w": 604800}


def last_line(path: str | Path) -> str | None:
    lines = tail_lines(path, 1, block=8 * 1024)
    return lines[-1] if lines else None


def run_lines(path: str | Path, max_bytes: int = 2 * 1024 * 1024) -> list[str]:
    """The non-empty lines of the engine's latest run (after the last `===== sage llm start` header), at most the last
    `max_bytes` of it: what failure diagnosis reads, so a root cause far above the last 200 lines is still seen."""
    from sage_llm.observe.progress import find_run_start

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


def screen_line(raw: str) -> str:
    """What a terminal shows for a line redrawn with \\r: its last non-empty drawing."""
    if "\r" not in raw:
        return raw
    parts = [p for p in raw.split("\r") if p.strip()]
    return parts[-1] if parts else ""


def _reverse_lines(path: str | Path, block: int = BLOCK, end: int | None = None) -> Iterator[str]:
    """The file's lines (split on \\n, terminal view of \\r), last first, reading blocks from the end (or `end`)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        pos = fh.tell() if end is None else min(end, fh.tell())
        rest = b""
        first = True
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + rest
            parts = data.split(b"\n")
            rest = parts.pop(0)  # may continue in the previous block
            if first:
                first = False
                if parts and parts[-1] == b"":
                    parts.pop()  # the file's final newline
            for part in reversed(parts):
                yield screen_line(part.decode("utf-8", "replace").rstrip("\r"))
        if rest or not first:
            yield screen_line(rest.decode("utf-8", "replace").rstrip("\r"))


def tail(path: str | Path, n: int, end: int | None = None) -> list[str]:
    """The last `n` lines as a terminal shows them (blank lines kept), seeking from the end: O(n), not O(size).
    With `end` (a byte offset, e.g. `complete_end()`): the last `n` lines before it."""
    if n <= 0:
        return []
    out: list[str] = []
    try:
        for line in _reverse_lines(path, end=end):
            out.append(line)
            if len(out) >= n:
                break
    except OSError:
        return []
    out.reverse()
    return out


def complete_end(path: str | Path, block: int = BLOCK) -> int:
    """The byte offset just past the file's last complete line (0 if none): where `tail(end=...)` stops and
    `follow(start_offset=...)` goes on, so a line written in between is shown once, whole."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            pos = fh.tell()
            while pos > 0:
                step = min(block, pos)
                pos -= step
                fh.seek(pos)
                i = fh.read(step).rfind(b"\n")
                if i >= 0:
                    return pos + i + 1
    except OSError:
        pass
    return 0


def parse_duration(text: str) -> float:
    """Seconds in "90s", "10m", "1h30m", "2d", "1.5h", "45" (seconds). Raises ValueError."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    total, pos = 0.0, 0
    for m in _DURATION.finditer(s):
        if s[pos:m.start()].strip():
            raise ValueError(text)
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos == 0 or s[pos:].strip():
        raise ValueError(text)
    return total


def line_time(line: str, now: datetime | None = None) -> float | None:
    """The epoch time a log line carries (vLLM's local `MM-DD HH:MM:SS`, or our start header), else None."""
    m = _VLLM_TS.match(line)
    if m:
        now = now or datetime.now()
        mon, day, hh, mm, ss = map(int, m.groups())
        try:
            t = datetime(now.year, mon, day, hh, mm, ss)
        except ValueError:
            return None
        if t - now > timedelta(days=1):  # December's lines read in January
            t = t.replace(year=now.year - 1)
        return t.timestamp()
    m = _HEADER_TS.match(line)
    if m:
        from datetime import timezone

        return datetime.fromisoformat(m.group(1)).replace(tzinfo=timezone.utc).timestamp()
    return None


def since(path: str | Path, seconds: float, now: float | None = None, end: int | None = None) -> list[str]:
    """Lines written in the last `seconds`, by the times the lines carry (a line without one goes with the line
    above it), reading backwards only as far as needed (from byte `end` when given, as `tail`)."""
    cutoff = (now if now is not None else time.time()) - seconds
    out: list[str] = []
    now_dt = datetime.fromtimestamp(now) if now is not None else None
    reached_older = False
    try:
        for line in _reverse_lines(path, end=end):
            t = line_time(line, now_dt)
            if t is not None and t < cutoff:
                reached_older = True
                break
            out.append(line)
    except OSError:
        return []
    out.reverse()
    if not reached_older:
        return out
    # lines before the first timestamped one belong to the older line above them
    for i, line in enumerate(out):
        if line_time(line, now_dt) is not None:
            return out[i:]
    return []


@dataclass
class Event:
    kind: str  # "line" | "notice" | "end"
    text: str


ANCHOR = 4096  # follow(): the last bytes read, compared with the file at the same place to see it was rewritten


def follow(path: str | Path, stop: Callable[[], str | None] | None = None, poll: float = 0.2,
           check_every: float = 1.0, start_at_end: bool = True, sleep: Callable[[float], None] = time.sleep,
           start_offset: int | None = None) -> Iterator[Event]:
    """Yield lines appended to `path` as they come (from `start_offset` when given, else from the end or the start).
    Survives truncation (reads on from the top) and rotation (drains
    the old file, then reads the new one from its start). Ends when `stop()` returns a reason (checked every
    `check_every` s, after reading everything written so far).

    A rotated file is told by its inode. A truncated one by its size (below what was read), and one truncated and
    rewritten to the old length or beyond by its content: the last bytes read (up to ANCHOR) must still be in the file
    where they were read, checked after each read and each idle poll (one pread, no need for a mtime that may not
    move within the same clock tick)."""
    path = Path(path)
    fh = None
    ino = None
    anchor = b""  # the last bytes read, ending at fh.tell()
    rest = b""
    last_check = 0.0

    def emit_chunk(data: bytes) -> Iterator[Event]:
        nonlocal rest
        buf = rest + data
        parts = buf.split(b"\n")
        rest = parts.pop()
        for p in parts:
            yield Event("line", screen_line(p.decode("utf-8", "replace").rstrip("\r")))

    def open_current(at_end: bool) -> None:
        nonlocal fh, ino, anchor
        try:
            new = open(path, "rb")  # kept open across yields
        except OSError:
            fh, ino = None, None
            return
        anchor = b""
        if at_end:
            end = new.seek(0, os.SEEK_END)
            anchor = os.pread(new.fileno(), min(ANCHOR, end), max(0, end - ANCHOR))
        fh, ino = new, os.fstat(new.fileno()).st_ino

    def rewritten(pos: int) -> bool:
        """The open file no longer holds, before `pos`, what was read there: truncated (and maybe written again)."""
        assert fh is not None
        try:
            if os.fstat(fh.fileno()).st_size < pos:
                return True
            return bool(anchor) and os.pread(fh.fileno(), len(anchor), pos - len(anchor)) != anchor
        except OSError:
            return False

    open_current(start_at_end and start_offset is None)
    if fh is not None and start_offset is not None:
        start = fh.seek(min(start_offset, os.fstat(fh.fileno()).st_size))
        anchor = os.pread(fh.fileno(), min(ANCHOR, start), max(0, start - ANCHOR))
    try:
        while True:
            got = False
            if fh is not None:
                pos = fh.tell()
                data = fh.read(1 << 20)
                if rewritten(pos):
                    # what was just read may be the new content's middle: read the file again from the top
                    rest = anchor = b""
                    fh.seek(0)
                    yield Event("notice", f"log truncated: reading {path.name} from the start")
                    continue
                if data:
                    got = True
                    anchor = (anchor + data)[-ANCHOR:]
                    yield from emit_chunk(data)
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    st = None
                if st is not None and st.st_ino != ino:
                    data = fh.read()  # drain what the old file got before the switch
                    if data:
                        yield from emit_chunk(data)
                    if rest:
                        yield Event("line", screen_line(rest.decode("utf-8", "replace")))
                        rest = b""
                    fh.close()
                    yield Event("notice", f"log rotated: reading the new {path.name}")
                    open_current(False)
                    continue
            else:
                open_current(False)
                if fh is not None:
                    yield Event("notice", f"log {path.name} appeared")
                    continue
            now = time.monotonic()
            if stop is not None and not got and now - last_check >= check_every:
                last_check = now
                reason = stop()
                if reason:
                    if fh is not None:
                        data = fh.read()
                        if data:
                            yield from emit_chunk(data)
                    if rest:
                        yield Event("line", screen_line(rest.decode("utf-8", "replace")))
                    yield Event("end", reason)
                    return
            sleep(poll)
    finally:
        if fh is not None:
            fh.close()
