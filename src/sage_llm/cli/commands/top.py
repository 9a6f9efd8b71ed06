"""`sage-llm top`: a full-screen live dashboard of GPUs and engines. Data comes from sage_llm.engine.monitor; this
file only draws it (Rich) and runs the loop (refresh every -n seconds; `q` or Ctrl-C quits and restores the
terminal)."""

from __future__ import annotations

import os
import select
import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer

from sage_llm.cli import _output as out

EPILOG = "Examples: sage-llm top | sage-llm top -n 2 | sage-llm top --once > snapshot.txt"

STATE_STYLE = {"ready": "green", "starting": "yellow", "unhealthy": "red", "failed": "bold red", "stopped": "dim"}
SPARK_WIDTH = 24


Cell = list[tuple[str, str]]  # (text, style) segments


def _bar(fraction: float | None, width: int = 10) -> Cell:
    if fraction is None:
        return [("·" * width, "dim")]
    f = max(0.0, min(1.0, fraction))
    full = int(f * width + 0.5)
    style = "green" if f < 0.7 else ("yellow" if f < 0.9 else "red")
    return [("█" * full, style), ("░" * (width - full), "dim")]


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.1f}"


def _grid(columns: list[tuple[str, str]], rows: list[list[Any]]) -> list[Any]:
    """A borderless table as one Rich Text per line: columns [(header, "l"|"r")], cells str or [(text, style)].

    Laid out by hand (column width = widest cell, two spaces apart, lines cropped to the terminal, never wrapped):
    Rich's Table measures and wraps every cell, which alone cost more than the 3% CPU budget at 1 Hz."""
    from rich.cells import cell_len
    from rich.text import Text

    grid: list[list[Cell]] = [[[(h, "bold")] for h, _j in columns]]
    grid += [[[(c, "")] if isinstance(c, str) else c for c in row] for row in rows]
    lens = [[sum(cell_len(t) for t, _s in cell) for cell in row] for row in grid]
    widths = [max(r[i] for r in lens) for i in range(len(columns))]
    lines = []
    for row, row_lens in zip(grid, lens):
        line = Text(no_wrap=True, overflow="crop", end="\n")
        for i, (cell, n) in enumerate(zip(row, row_lens)):
            if i:
                line.append("  ")
            pad = " " * (widths[i] - n)
            if columns[i][1] == "r":
                line.append(pad)
            for text, style in cell:
                line.append(text, style or None)
            if columns[i][1] != "r" and i < len(columns) - 1:
                line.append(pad)
        line.rstrip()
        lines.append(line)
    return lines


def render(frame: Any) -> Any:
    """One screen for a monitor.Frame (a Rich renderable; the tests print it to a string console)."""
    from rich.console import Group
    from rich.text import Text

    from sage_llm.engine.monitor import sparkline

    minutes = frame.history_s / 60
    span = f"{minutes:.0f} min" if minutes >= 1 else f"{frame.history_s:.0f} s"
    when = datetime.fromtimestamp(frame.at).strftime("%H:%M:%S")
    n_ready = sum(e.state == "ready" for e in frame.engines)
    title = Text(f"sage-llm top  {when}  every {frame.interval:g} s  ", style="bold", no_wrap=True, overflow="crop")
    title.append(f"{len(frame.engines)} engine(s), {n_ready} ready, {len(frame.gpus)} GPU(s)", style="")
    title.append("   q: quit", style="dim")
    parts: list[Any] = [title, Text("")]

    if frame.gpus:
        rows = []
        for row in frame.gpus:
            g = row.info
            util = g.utilization_percent
            mem_frac = (g.memory_used_bytes / g.memory_total_bytes
                        if g.memory_used_bytes is not None and g.memory_total_bytes else None)
            power = "-" if g.power_draw_w is None else f"{g.power_draw_w:.0f}" + (
                f"/{g.power_limit_w:.0f} W" if g.power_limit_w else " W")
            spark = sparkline(row.memory_history, SPARK_WIDTH, frame.history_s, frame.now,
                              top=float(g.memory_total_bytes) if g.memory_total_bytes else None)
            rows.append([str(g.index), (g.name or "n/a").replace("NVIDIA ", ""),
                         _bar(util / 100 if util is not None else None), _num(util, "{:.0f}%"),
                         _bar(mem_frac), f"{_gib(g.memory_used_bytes)}/{_gib(g.memory_total_bytes)}",
                         _num(g.temperature_c, "{:.0f}°C"), power, [(spark, "cyan")]])
        parts += _grid([("GPU", "l"), ("NAME", "l"), ("UTIL", "l"), ("", "r"), ("MEMORY (GiB)", "l"), ("", "l"),
                        ("TEMP", "r"), ("POWER", "r"), (f"MEMORY, last {span}", "l")], rows)
    else:
        parts.append(Text(f"No GPU: {frame.gpu_error or 'NVML reports no GPU'}", style="yellow"))

    parts.append(Text(""))
    if frame.engines:
        rows = []
        for e in frame.engines:
            state = e.state + ("" if e.managed else " (ext)")
            if e.state == "starting" and e.stage:
                state += f": {e.stage}" + (f" {e.progress:.0%}" if e.progress is not None else "")
            if e.metrics_error and e.state == "ready":
                state += " (no metrics)"
            model = e.model or "-"
            if len(model) > 32:
                model = "…" + model[-31:]
            spark = sparkline(e.generation_history, SPARK_WIDTH, frame.history_s, frame.now)
            ttft = _ms(e.ttft_p50_s) + ("" if e.ttft_recent or e.ttft_p50_s is None else "*")
            kv_pct = None if e.kv_cache_usage is None else e.kv_cache_usage * 100
            port = _num(e.port, "{}") if not any(x.node for x in frame.engines) else f"{e.node or 'here'}:{e.port}"
            rows.append([e.name, [(state, STATE_STYLE.get(e.state, ""))], model, port,
                         _gib(e.vram_bytes), ",".join(map(str, e.gpus)) or "-", _num(e.running), _num(e.waiting),
                         _bar(e.kv_cache_usage, 8), _num(kv_pct, "{:.0f}%"), _num(e.prompt_tps, "{:.1f}"),
                         _num(e.generation_tps, "{:.1f}"), ttft, [(spark, "magenta")]])
        where = "NODE:PORT" if any(x.node for x in frame.engines) else "PORT"  # engines on a Ray cluster
        parts += _grid([("ENGINE", "l"), ("STATE", "l"), ("MODEL", "l"), (where, "r"), ("VRAM GiB", "r"),
                        ("GPU", "l"), ("RUN", "r"), ("WAIT", "r"), ("KV", "l"), ("", "r"), ("PROMPT t/s", "r"),
                        ("GEN t/s", "r"), ("TTFT p50", "r"), (f"GEN t/s, last {span}", "l")], rows)
        if any(e.ttft_p50_s is not None and not e.ttft_recent for e in frame.engines):
            parts.append(Text("* TTFT over all requests since the engine started (none in the last minute)",
                              style="dim"))
    else:
        parts.append(Text("No engines. Start one: sage-llm start MODEL", style="dim"))
    for w in frame.warnings[:3]:
        parts.append(Text(f"Warning: {w}", style="yellow", no_wrap=True, overflow="crop"))
    return Group(*parts)


def _wait_for_key(fd: int | None, wake: int, seconds: float) -> bool:
    """Sleep up to `seconds`; True if q/Q/Ctrl-C was typed, or a signal arrived (a byte on `wake`), meanwhile."""
    deadline = time.monotonic() + seconds
    watch = [wake] if fd is None else [fd, wake]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select(watch, [], [], left)
        if wake in ready:
            return True
        if fd is not None and fd in ready:
            data = os.read(fd, 64)
            if not data or any(c in data for c in (b"q", b"Q", b"\x03")):
                return True


def top(
    interval: Annotated[float, typer.Option("-n", "--interval", help="Seconds between refreshes.")] = 1.0,
    history: Annotated[float, typer.Option("--history", help="Seconds of history in the sparklines.")] = 300.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (no full screen, no keys).")]
    = False,
) -> None:
    """Live dashboard: GPUs (utilisation, memory, temperature, power) and engines (state, VRAM, requests, KV cache,
    tokens/s, time to first token), with sparklines. Press q or Ctrl-C to quit."""
    from sage_llm.core.errors import UsageError
    from sage_llm.engine.monitor import Monitor

    if not interval > 0 or interval < 0.1:
        raise UsageError(f"-n {interval:g} is too short", hint="give the refresh period in seconds, 0.1 or more")
    if not history >= interval:
        raise UsageError(f"--history {history:g} is shorter than -n {interval:g}", hint="e.g. --history 300")
    console = out.console()
    monitor = Monitor(interval=interval, history_s=history)
    try:
        if once:
            monitor.tick()  # two reads a moment apart, so the rates have something to compare
            time.sleep(min(interval, 1.0))
            console.print(render(monitor.tick()))
            return
        if not console.is_terminal:
            raise UsageError("`top` needs a terminal", hint="use `sage-llm top --once` or `sage-llm status --json`")
        _run_live(monitor, console, interval)
    finally:
        monitor.close()


def _run_live(monitor: Any, console: Any, interval: float) -> None:
    """Full screen until q, Ctrl-C or SIGTERM. Signals only set a flag (and wake the wait): an exception raised in
    the middle of drawing could leave Rich's output buffered and the terminal in the alternate screen."""
    from rich.live import Live

    from sage_llm.cli import _signals

    sigs = _signals.Signals().start()
    fd: int | None = None
    saved = None
    if sys.stdin.isatty():
        import termios
        import tty

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)  # keys arrive one by one, not echoed
    try:
        frame = monitor.tick()
        with Live(render(frame), console=console, screen=True, auto_refresh=False, transient=True) as live:
            next_at = time.monotonic() + interval
            while True:
                if _wait_for_key(fd, sigs.fd, max(0.0, next_at - time.monotonic())):
                    break
                next_at = max(next_at + interval, time.monotonic())  # a slow tick delays, never bunches, the next
                live.update(render(monitor.tick()), refresh=True)
    finally:
        if saved is not None and fd is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sigs.close()
