"""The load-progress display of `start --wait` and `run` on stderr.

In a terminal: a live Rich block (the stage, a bar when the stage has a fraction, the time spent in the stage and in
total, the stages already done with their times, the latest log line). Otherwise (piped, CI, TERM=dumb): one plain
line per stage change or detail change (at most every 1 s), and a heartbeat every 15 s.

It consumes the `on_progress` dicts of `manager.wait_ready` (keys: elapsed_s, log_line, record, stage, progress,
detail, stage_elapsed_s, snapshot).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from sage_llm.cli import _output as out
from sage_llm.observe.progress import LABELS


def _fmt_s(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m {s:02d}s"


class LoadDisplay:
    def __init__(self, enabled: bool = True, tty: bool | None = None, heartbeat_s: float = 15.0) -> None:
        self.enabled = enabled
        self.tty = (sys.stderr.isatty() and os.environ.get("TERM") != "dumb") if tty is None else tty
        self.live: Any = None
        self.heartbeat_s = heartbeat_s
        self.last: dict[str, Any] | None = None
        self.last_plain_key: tuple[Any, ...] | None = None
        self.last_plain_at = 0.0
        self.stages_printed = 0

    # -------------------------------------------------------------------------------------------------- updates
    def update(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.last = info
        if self.tty:
            self._live(info)
        else:
            self._plain(info)

    def _name(self, info: dict[str, Any]) -> str:
        return getattr(info.get("record"), "name", None) or "engine"

    def _plain(self, info: dict[str, Any]) -> None:
        snap = info.get("snapshot")
        if snap is not None:  # stages passed between two updates still get their line, once
            for name, _t in snap.stages[self.stages_printed:-1]:
                out.info(f"[{info.get('elapsed_s', 0.0):6.1f}s] {self._name(info)}: {LABELS.get(name, name)}")
                self.last_plain_key = (name, None)
            self.stages_printed = max(self.stages_printed, len(snap.stages) - 1)
        stage = info.get("stage") or "launching"
        detail = info.get("detail")
        frac = info.get("progress")
        now = time.monotonic()
        key = (stage, detail)
        stage_changed = self.last_plain_key is None or self.last_plain_key[0] != stage
        due = now - self.last_plain_at >= (0 if stage_changed else 1.0)
        if (key != self.last_plain_key and due) or now - self.last_plain_at >= self.heartbeat_s:
            parts = [LABELS.get(stage, stage)]
            if detail:
                parts.append(f"({detail})")
            if frac is not None and stage != "ready":
                parts.append(f"{frac:.0%}")
            line = f"[{info.get('elapsed_s', 0.0):6.1f}s] {self._name(info)}: {' '.join(parts)}"
            if key == self.last_plain_key and info.get("log_line"):
                line += f" | {str(info['log_line'])[-160:]}"  # heartbeat: show what vLLM is doing
            out.info(line)
            self.last_plain_key = key
            self.last_plain_at = now
            if snap is not None:
                self.stages_printed = len(snap.stages)

    def renderable(self, info: dict[str, Any]) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        stage = info.get("stage") or "launching"
        frac = info.get("progress")
        snap = info.get("snapshot")
        head = Table.grid(padding=(0, 1))
        head.add_column()
        head.add_column()
        head.add_column()
        head.add_column()
        label = Text(f"{self._name(info)}: ", style="bold")
        label.append(LABELS.get(stage, stage), style="bold cyan")
        if frac is not None and stage != "ready":
            bar: Any = ProgressBar(total=1.0, completed=frac, width=28)
            pct = Text(f"{frac:4.0%}")
        else:
            bar = Text("")
            pct = Text("")
        times = Text(f"{_fmt_s(info.get('stage_elapsed_s') or 0.0)}  (total {_fmt_s(info.get('elapsed_s') or 0.0)})",
                     style="dim")
        head.add_row(label, bar, pct, times)
        rows: list[Any] = [head]
        if info.get("detail"):
            rows.append(Text(f"  {info['detail']}"))
        if snap is not None:
            done = [(s, d) for s, d in snap.durations()[:-1] if d >= 0.05]
            if done:
                rows.append(Text("  done: " + ", ".join(f"{LABELS.get(s, s)} {_fmt_s(d)}" for s, d in done),
                                 style="dim"))
        line = info.get("log_line")
        if line:
            rows.append(Text(f"  {str(line)[-200:]}", style="dim", no_wrap=True, overflow="ellipsis"))
        return Group(*rows)

    def _live(self, info: dict[str, Any]) -> None:
        from rich.live import Live

        if self.live is None:
            self.live = Live(self.renderable(info), console=out.console(stderr=True), refresh_per_second=8,
                             transient=True)
            self.live.start()
        else:
            self.live.update(self.renderable(info))

    # -------------------------------------------------------------------------------------------------- the end
    def summary(self) -> str | None:
        """"loaded in 31.0 s: resolving config 2.1 s, loading weights 5.0 s, ..." once the engine is ready."""
        info = self.last
        if not info or info.get("stage") != "ready" or info.get("snapshot") is None:
            return None
        parts = [f"{LABELS.get(s, s)} {_fmt_s(d)}" for s, d in info["snapshot"].durations()[:-1] if d >= 0.05]
        return f"{self._name(info)} loaded in {_fmt_s(info.get('elapsed_s') or 0.0)}" + (
            f": {', '.join(parts)}" if parts else "")

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.enabled:
            text = self.summary()
            if text:
                out.info(text)
            self.enabled = False
