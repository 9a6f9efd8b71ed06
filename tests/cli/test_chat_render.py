"""The streaming Markdown renderer: block splitting, bounded refresh rate, Ctrl-C held back while drawing."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import time

import pytest
from rich.console import Console

from sage_llm.cli.commands.chat import MarkdownRenderer, PlainRenderer, _SigintGuard

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

REPLY = """# Plan

Some **bold** text.

```python
x = 1

y = 2
```

- one
- two

The end."""


def console(buf: io.StringIO) -> Console:
    return Console(file=buf, force_terminal=True, width=60, color_system=None, markup=False, emoji=False,
                   highlight=False)


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_blocks_are_committed_once_and_code_fences_are_not_split():
    buf = io.StringIO()
    r = MarkdownRenderer(console(buf), refresh_hz=1000)
    cut = REPLY.index("y = 2")
    for p in pieces(REPLY[:cut]):
        r.feed(p)
    assert r.buf.startswith("```python\nx = 1\n\n")  # a blank line inside a code fence does not end the block
    for p in pieces(REPLY[cut:]):
        r.feed(p)
    assert r.buf == "The end."  # the unfinished block: everything before it is drawn (or about to be) for good
    assert r.ready.endswith("- one\n- two\n\n") or r.committed >= 1
    r.finish()
    text = ANSI.sub("", buf.getvalue())
    assert "Plan" in text
    assert "Some bold text." in text
    assert "x = 1" in text
    assert "y = 2" in text
    assert "• one" in text
    assert text.rstrip().endswith("The end.")
    assert "```python" not in text.split("x = 1")[-1]  # once the code block is drawn, only as code


def test_refresh_rate_is_bounded():
    buf = io.StringIO()
    r = MarkdownRenderer(console(buf), refresh_hz=10)
    start = time.monotonic()
    for i in range(5000):
        r.feed(f"w{i} ")
    elapsed = time.monotonic() - start
    r.finish()
    assert r.refreshes <= elapsed * 10 + 2
    assert "w4999" in ANSI.sub("", buf.getvalue())


def test_plain_renderer_ends_the_line():
    buf = io.StringIO()
    r = PlainRenderer(buf)
    for p in ("a", "b"):
        r.feed(p)
    r.finish()
    r.finish()
    assert buf.getvalue() == "ab\n"
    buf2 = io.StringIO()
    r2 = PlainRenderer(buf2)
    r2.feed("done\n")
    r2.finish()
    assert buf2.getvalue() == "done\n"


def _interrupt_inside(section) -> list[str]:
    done = []
    with section:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        done.append("drawn to the end")
    return done


def test_sigint_is_held_back_while_drawing():
    before = signal.getsignal(signal.SIGINT)
    guard = _SigintGuard()
    try:
        with pytest.raises(KeyboardInterrupt):
            _interrupt_inside(guard)  # raised once the section is over
        with pytest.raises(KeyboardInterrupt):  # outside a drawing section: at once
            _interrupt_inside(contextlib.nullcontext())
        assert _interrupt_inside(guard.quiet()) == ["drawn to the end"]  # dropped
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_long_code_block_is_cut_into_pieces_and_joined_back():
    code = "".join(f"x{i} = {i}\n" for i in range(45))
    text = "```python\n" + code + "```\n\nafter"
    r = MarkdownRenderer(console(io.StringIO()), refresh_hz=0.001)  # the first feed draws, then no more draws
    r.feed("")
    for p in pieces(text, 4):
        r.feed(p)
    assert r.ready == "```python\n" + code + "```\n\n"  # cut at 20 and 40 lines, joined back while undrawn
    assert r.buf == "after"
    r.finish()

    r = MarkdownRenderer(console(io.StringIO()), refresh_hz=0.001)
    r.feed("")
    for p in pieces("```python\n" + code, 4):
        r.feed(p)
    assert r.ready == "```python\n" + "".join(f"x{i} = {i}\n" for i in range(40)) + "```\n"
    assert r.buf == "```python\n" + "".join(f"x{i} = {i}\n" for i in range(40, 45))  # reopened in the tail
    r.finish()


def test_live_tail_shows_only_the_newest_lines():
    from sage_llm.cli.commands.chat import _Block

    buf = io.StringIO()
    c = console(buf)
    c.print(_Block("```\n" + "".join(f"line {i}\n" for i in range(30)) + "```\n", gap=False, last_lines=5))
    shown = [ln.strip() for ln in ANSI.sub("", buf.getvalue()).splitlines() if ln.strip()]
    assert shown == [f"line {i}" for i in range(25, 30)]
