"""`sage llm top`: a full-screen live dashboard of GPUs and engines. Data comes from sage_llm.monitor; this file only
draws it (Rich) and runs the loop (refresh every -n seconds; `q` or Ctrl-C quits and restores the terminal)."""

from __future__ import annotations

import os
import select
import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer

from sage_llm.cli import _output as out

EPILOG = "Examples: sage llm top | sage llm top -n 2 | sage llm top --once > snapshot.txt"

STATE_STYLE = {"ready": "green", "starting": "yellow", "unhealthy": "red", "failed": "bold red", "stopped": "dim"}
SPARK_WIDTH = 24


def _bar(fraction: float | None, width: int = 10) -> Any:
    from rich.text import Text

    if fraction is None:
        return Text("·" * width, style="dim")
    f = max(0.0, min(1.0, fraction))
    full = round(f * width)
    style = "green" if f < 0.7 else ("yellow" if f < 0.9 else "red")
    return Text("█" * full, style=style) + Text("░" * (width - full), style="dim")


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


def render(frame: Any) -> Any:
    """One screen for a monitor.Frame (a Rich renderable; the tests print it to a string console)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from sage_llm.monitor import sparkline

    minutes = frame.history_s / 60
    span = f"{minutes:.0f} min" if minutes >= 1 else f"{frame.history_s:.0f} s"
    when = datetime.fromtimestamp(frame.at).strftime("%H:%M:%S")
    n_ready = sum(e.state == "ready" for e in frame.engines)
    title = Text(f"sage llm top  {when}  every {frame.interval:g} s  ", style="bold")
    title.append(f"{len(frame.engines)} engine(s), {n_ready} ready, {len(frame.gpus)} GPU(s)", style="")
    title.append("   q: quit", style="dim")
    parts: list[Any] = [title]

    if frame.gpus:
        gt = Table(box=None, pad_edge=False, header_style="bold", expand=False)
        for col in ("GPU", "NAME", "UTIL", "", "MEMORY (GiB)", "", "TEMP", "POWER", f"MEMORY, last {span}"):
            gt.add_column(col, no_wrap=True)
        for row in frame.gpus:
            g = row.info
            util = g.utilization_percent
            mem_frac = (g.memory_used_bytes / g.memory_total_bytes
                        if g.memory_used_bytes is not None and g.memory_total_bytes else None)
            power = "-" if g.power_draw_w is None else f"{g.power_draw_w:.0f}" + (
                f"/{g.power_limit_w:.0f} W" if g.power_limit_w else " W")
            spark = sparkline(row.memory_history, SPARK_WIDTH, frame.history_s, frame.now,
                              top=float(g.memory_total_bytes) if g.memory_total_bytes else None)
            gt.add_row(str(g.index), (g.name or "n/a").replace("NVIDIA ", ""),
                       _bar(util / 100 if util is not None else None), _num(util, "{:.0f}%"),
                       _bar(mem_frac), f"{_gib(g.memory_used_bytes)}/{_gib(g.memory_total_bytes)}",
                       _num(g.temperature_c, "{:.0f}°C"), power, Text(spark, style="cyan"))
        parts += [Text(""), gt]
    else:
        parts += [Text(""), Text(f"No GPU: {frame.gpu_error or 'NVML reports no GPU'}", style="yellow")]

    parts.append(Text(""))
    if frame.engines:
        et = Table(box=None, pad_edge=False, header_style="bold", expand=False)
        for col, justify in (("ENGINE", "left"), ("STATE", "left"), ("MODEL", "left"), ("PORT", "right"),
                             ("VRAM GiB", "right"), ("GPU", "left"), ("RUN", "right"), ("WAIT", "right"),
                             ("KV", "left"), ("", "right"), ("PROMPT t/s", "right"), ("GEN t/s", "right"),
                             ("TTFT p50", "right"), (f"GEN t/s, last {span}", "left")):
            et.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
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
            et.add_row(e.name, Text(state, style=STATE_STYLE.get(e.state, "")), model, _num(e.port, "{}"),
                       _gib(e.vram_bytes), ",".join(map(str, e.gpus)) or "-", _num(e.running), _num(e.waiting),
                       _bar(e.kv_cache_usage, 8), _num(None if e.kv_cache_usage is None else e.kv_cache_usage * 100,
                                                      "{:.0f}%"),
                       _num(e.prompt_tps, "{:.1f}"), _num(e.generation_tps, "{:.1f}"), ttft,
                       Text(spark, style="magenta"))
        parts.append(et)
        if any(e.ttft_p50_s is not None and not e.ttft_recent for e in frame.engines):
            parts.append(Text("* TTFT over all requests since the engine started (none in the last minute)",
                              style="dim"))
    else:
        parts.append(Text("No engines. Start one: sage llm start MODEL", style="dim"))
    for w in frame.warnings[:3]:
        parts.append(Text(f"Warning: {w}", style="yellow"))
    return Group(*parts)


def _wait_for_key(fd: int | None, seconds: float) -> bool:
    """Sleep up to `seconds`; True if q/Q/Ctrl-C was typed meanwhile."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
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
    from sage_llm.errors import UsageError
    from sage_llm.monitor import Monitor

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
            raise UsageError("`top` needs a terminal", hint="use `sage llm top --once` or `sage llm status --json`")
        _run_live(monitor, console, interval)
    finally:
        monitor.close()


def _run_live(monitor: Any, console: Any, interval: float) -> None:
    from rich.live import Live

    fd: int | None = None
    saved = None
    if sys.stdin.isatty():
        import termios
        import tty

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)  # keys arrive one by one, not echoed; Ctrl-C still raises KeyboardInterrupt
    try:
        frame = monitor.tick()
        with Live(render(frame), console=console, screen=True, auto_refresh=False, transient=True) as live:
            next_at = time.monotonic() + interval
            while True:
                if _wait_for_key(fd, max(0.0, next_at - time.monotonic())):
                    break
                next_at = max(next_at + interval, time.monotonic())  # a slow tick delays, never bunches, the next
                live.update(render(monitor.tick()), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        if saved is not None and fd is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
