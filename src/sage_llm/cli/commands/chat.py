"""`sage-llm chat`: stream a conversation with a local engine or a cloud OpenAI-compatible API.

Tokens go to stdout, everything else (source, stats, notices, errors) to stderr. In a terminal the reply renders as
Markdown while it streams: finished blocks are printed once, only the block being written is redrawn, at most
REFRESH_HZ times a second. `--plain` or a non-terminal stdout prints the raw text.
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Annotated, Any

import typer

from sage_llm.cli import _complete
from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

EPILOG = (
    "Examples: sage-llm chat | sage-llm chat qwen -p 'Why is the sky blue?' > answer.txt | "
    "git diff | sage-llm chat -s 'Review this diff' | sage-llm chat --source cloud --model gpt-4o-mini | "
    "sage-llm chat 8001 -p hi --json. "
    "Environment: SAGE_CHAT_BASE_URL, SAGE_CHAT_API_KEY, SAGE_CHAT_MODEL (cloud; falling back to OPENAI_BASE_URL, "
    "OPENAI_API_KEY), SAGE_LOCAL_ENGINE_PORT (preferred local engine). In the chat, /help lists the commands."
)

REFRESH_HZ = 12.0
CODE_CHUNK_LINES = 20  # a long code block is drawn for good in pieces of this many lines


# ------------------------------------------------------------------------------------------------------ renderers
class PlainRenderer:
    """Raw text straight to stdout."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.last = "\n"

    def feed(self, piece: str) -> None:
        self.stream.write(piece)
        self.stream.flush()
        self.last = piece[-1:] or self.last

    def finish(self) -> None:
        if self.last != "\n":
            self.stream.write("\n")
            self.stream.flush()
            self.last = "\n"


class NullRenderer:
    def feed(self, piece: str) -> None:
        pass

    def finish(self) -> None:
        pass


_MARKDOWN: list[Any] = []


def _markdown_class() -> Any:
    """rich's Markdown, with code blocks that reuse one Pygments lexer per language (rich looks the lexer up for
    every code block, which costs milliseconds each time: a noticeable part of drawing a long reply)."""
    if _MARKDOWN:
        return _MARKDOWN[0]
    import functools

    from rich.markdown import CodeBlock, Markdown
    from rich.syntax import Syntax

    @functools.lru_cache(maxsize=64)
    def lexer(name: str) -> Any:
        from pygments.lexers import get_lexer_by_name
        from pygments.util import ClassNotFound

        try:
            return get_lexer_by_name(name, stripnl=False, ensurenl=True, tabsize=4)
        except ClassNotFound:
            return get_lexer_by_name("text", stripnl=False, ensurenl=True, tabsize=4)

    class CachedCodeBlock(CodeBlock):
        def __rich_console__(self, console: Any, options: Any) -> Any:
            yield Syntax(str(self.text).rstrip(), lexer(self.lexer_name), theme=self.theme, word_wrap=True,
                         padding=1)

    class FastMarkdown(Markdown):
        elements = {**Markdown.elements, "fence": CachedCodeBlock, "code_block": CachedCodeBlock}

    _MARKDOWN.append(FastMarkdown)
    return FastMarkdown


class _Block:
    """One Markdown block, rendered without blank lines at its edges; `gap`: one blank line before it.

    Rich renders each document with its own edge spacing (lists and code blocks start with a blank line), so blocks
    printed one by one get the spacing of one document only if the edges are trimmed and the gaps put back.
    """

    def __init__(self, text: str, gap: bool, last_lines: int | None = None) -> None:
        self.text = text
        self.gap = gap
        self.last_lines = last_lines  # live region: only the newest lines, so it never outgrows the screen

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.segment import Segment

        lines = console.render_lines(_markdown_class()(self.text, code_theme="ansi_dark", hyperlinks=False),
                                     options, pad=False)

        def blank(line: list[Any]) -> bool:
            return not "".join(seg.text for seg in line).strip()

        start, end = 0, len(lines)
        while start < end and blank(lines[start]):
            start += 1
        while end > start and blank(lines[end - 1]):
            end -= 1
        if self.last_lines is not None and end - start > self.last_lines:
            start = end - self.last_lines
        if self.gap and start < end:
            yield Segment.line()
        for line in lines[start:end]:
            yield from line
            yield Segment.line()


class MarkdownRenderer:
    """Markdown while streaming, without re-rendering the whole reply per token.

    Text is split into blocks at blank lines outside code fences (and after a closing fence). Finished blocks are
    printed once, permanently, above a Rich Live region that shows only the unfinished block. Drawing happens at most
    `refresh_hz` times a second (no background thread: in `feed`), so every character is rendered as Markdown about
    once, plus the unfinished block at each refresh: the cost does not grow with the length of the reply.
    """

    def __init__(self, console: Any, refresh_hz: float = REFRESH_HZ) -> None:
        self.console = console
        self.interval = 1.0 / refresh_hz
        self.buf = ""  # the unfinished tail, redrawn in the live region
        self.ready = ""  # finished blocks not drawn yet
        self.scan = 0  # buf[:scan] is made of complete lines already looked at
        self.fence: str | None = None  # the fence marker (```, ~~~~) while inside a code block
        self.fence_open = ""  # its opening line, e.g. ```python
        self.fence_lines = 0
        self.ready_cut = ""  # the fence closing `ready` where a long code block was cut
        self.drawn_cut = False  # the last drawn block ended where a code block was cut: no gap before the next
        self.live: Any = None
        self.last_refresh = 0.0
        self.refreshes = 0
        self.committed = 0
        self.guard = _SigintGuard()
        self.tty_attrs = _quiet_tty()

    def _markdown(self, text: str, gap: bool = False) -> Any:
        return _Block(text, gap)

    def _tail(self, gap: bool) -> Any:
        return _Block(self.buf, gap, last_lines=max(3, self.console.height - 2))

    def _ensure_live(self) -> None:
        if self.live is None:
            from rich.live import Live

            self.live = Live(console=self.console, auto_refresh=False, transient=False, redirect_stdout=False,
                             redirect_stderr=False)
            self.live.start()

    def feed(self, piece: str) -> None:
        self.buf += piece
        if "\n" in piece:
            self._split()
        now = time.monotonic()
        if now - self.last_refresh >= self.interval:
            self.last_refresh = now
            with self.guard:
                self._draw()

    def _split(self) -> None:
        """Move the finished blocks at the head of `buf` to `ready` (drawn, once, at the next refresh).

        Blocks end at blank lines outside code fences and after a closing fence; a long code block is cut every
        CODE_CHUNK_LINES lines (closed there, reopened in the tail), so its finished lines need no redrawing."""
        boundary, reopen = 0, False
        while True:
            nl = self.buf.find("\n", self.scan)
            if nl < 0:
                break
            line = self.buf[self.scan:nl].strip()
            self.scan = nl + 1
            if self.fence is not None:
                if line.startswith(self.fence) and line.strip("`~") == "":
                    self.fence = None
                    boundary, reopen = self.scan, False
                else:
                    self.fence_lines += 1
                    if self.fence_lines >= CODE_CHUNK_LINES:
                        boundary, reopen = self.scan, True
                        self.fence_lines = 0
            elif line.startswith(("```", "~~~")):
                marker = line[0] * (len(line) - len(line.lstrip(line[0])))
                self.fence, self.fence_open, self.fence_lines = marker, line, 0
            elif not line:
                boundary, reopen = self.scan, False
        if boundary:
            head, self.buf = self.buf[:boundary], self.buf[boundary:]
            self.scan -= boundary
            reopened = self.fence_open + "\n"
            if self.ready_cut and head.startswith(reopened):
                # the previous piece of this code block is still waiting in `ready`: join them back
                self.ready = self.ready[: -len(self.ready_cut)] + head[len(reopened):]
            else:
                self.ready += head
            self.ready_cut = ""
            if reopen and self.fence is not None:
                self.ready_cut = self.fence + "\n"
                self.ready += self.ready_cut
                self.buf = reopened + self.buf
                self.scan += len(reopened)

    def _draw(self) -> None:
        self._ensure_live()
        if self.ready.strip():
            # finished blocks: printed above the live region, for good (one Markdown document per refresh)
            cut = bool(self.ready_cut)
            self.live.update(self._tail(gap=not cut), refresh=False)
            self.live.console.print(self._markdown(self.ready, gap=self.committed > 0 and not self.drawn_cut))
            self.committed += 1
            self.ready, self.ready_cut, self.drawn_cut = "", "", cut
        else:
            self.live.update(self._tail(gap=self.committed > 0 and not self.drawn_cut), refresh=True)
        self.refreshes += 1

    def finish(self) -> None:
        try:
            if self.live is None and not (self.buf + self.ready).strip():
                return
            with self.guard.quiet():
                self._ensure_live()
                rest = self.ready + self.buf
                if self.ready_cut and self.buf.startswith(self.fence_open + "\n"):
                    rest = self.ready[: -len(self.ready_cut)] + self.buf[len(self.fence_open) + 1:]
                self.ready, self.buf, self.scan, self.ready_cut = "", "", 0, ""
                self.live.update(self._markdown(rest, gap=self.committed > 0 and not self.drawn_cut), refresh=False)
                self.live.stop()
            self.live = None
        finally:
            self.guard.uninstall()
            _restore_tty(self.tty_attrs)
            self.tty_attrs = None


def _quiet_tty() -> Any:
    """Stop the terminal echoing keys (and "^C") into the live region while a reply is drawn; returns what to restore.

    An echoed "^C" or a typed key moves the cursor under Rich's feet and the next redraw duplicates lines."""
    try:
        import termios

        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            return None
        old = termios.tcgetattr(fd)
        new = list(old)
        new[3] &= ~(termios.ECHO | termios.ECHOCTL)
        termios.tcsetattr(fd, termios.TCSANOW, new)
        return (fd, old)
    except (ImportError, OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None


def _restore_tty(saved: Any) -> None:
    if saved is None:
        return
    import termios

    try:
        termios.tcsetattr(saved[0], termios.TCSANOW, saved[1])
    except (OSError, termios.error):
        pass


class _SigintGuard:
    """Ctrl-C while Rich is drawing would leave the terminal half redrawn (duplicated lines): inside `with guard:`
    SIGINT is held back and raised as KeyboardInterrupt when the drawing is done. Outside (waiting for the next
    token) it is raised at once, so a cancelled request closes its connection without waiting for the engine."""

    def __init__(self) -> None:
        import signal
        import threading

        self.busy = False
        self.pending = False
        self.previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.busy:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> None:
        self.busy = True

    def __exit__(self, *exc: object) -> None:
        self.busy = False
        if self.pending and exc[0] is None:
            self.pending = False
            raise KeyboardInterrupt

    def quiet(self) -> Any:
        """A section whose Ctrl-C is dropped (the final redraw: the reply is over anyway)."""
        import contextlib

        @contextlib.contextmanager
        def section() -> Any:
            self.busy = True
            try:
                yield
            finally:
                self.busy = False
                self.pending = False
        return section()

    def uninstall(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def make_renderer(json_: bool, plain: bool) -> Any:
    if json_:
        return NullRenderer()
    if plain or not sys.stdout.isatty():
        return PlainRenderer()
    return MarkdownRenderer(out.console())


# --------------------------------------------------------------------------------------------------------- input
def _line_reader(tty: bool) -> Any:
    """read_line(prompt) for the REPL: readline editing on a terminal, plain lines otherwise (scripted sessions)."""
    if tty:
        def read_tty(prompt: str) -> str:
            if sys.stdout.isatty():
                return input(prompt)
            sys.stderr.write(prompt)  # keep a redirected stdout free of prompts
            sys.stderr.flush()
            return input("")
        return read_tty

    def read_pipe(prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")
    return read_pipe


def _setup_history() -> Any:
    """Load readline history from the state directory; returns a function that saves it."""
    try:
        import readline
    except ImportError:  # pragma: no cover - not on Linux
        return lambda: None
    from sage_llm.chat.session import history_file
    from sage_llm.core import paths

    try:
        paths.ensure_home()
        path = history_file()
        readline.set_history_length(2000)
        try:
            readline.read_history_file(path)
        except (FileNotFoundError, OSError):
            pass
        readline.parse_and_bind("tab: complete")
    except Exception:
        return lambda: None

    def save() -> None:
        try:
            readline.write_history_file(path)
            os.chmod(path, 0o600)  # prompts can be private
        except OSError:
            pass
    return save


# ------------------------------------------------------------------------------------------------------- command
def chat(
    target: Annotated[str | None, typer.Argument(
        help="Local engine name or port (default: the engine on $SAGE_LOCAL_ENGINE_PORT, else the first ready one).",
        show_default=False, autocompletion=_complete.engines)] = None,
    source: Annotated[str, typer.Option("--source", help="auto (local first, cloud when no engine is ready), local, "
                                        "or cloud.")] = "auto",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name (default: the engine's served model, "
                                              "or $SAGE_CHAT_MODEL for the cloud).", show_default=False)] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Ask this one question, print the answer and "
                                               "exit (also: pipe text on stdin).", show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="Sampling temperature.",
                                                      show_default=False)] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Longest reply, in tokens.",
                                                   show_default=False)] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Wait for the whole reply, then print it.")] = False,
    json_: JsonOpt = False,
    plain: Annotated[bool, typer.Option("--plain", help="Print raw text, no Markdown rendering.")] = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Run the chat loop even when stdin is not "
                                              "a terminal (scripted sessions: one message per line).")] = False,
) -> None:
    """Chat with a local engine or a cloud API: a REPL in a terminal, one answer with -p or piped stdin.

    In the REPL: /help, /exit, /clear, /system TEXT, /model NAME, /source auto|local|cloud, /stats; \"\"\" starts
    multi-line input; Ctrl-C cancels the reply being written; Ctrl-D exits.
    """
    from sage_llm.chat import session as core
    from sage_llm.core.errors import UsageError

    if source not in core.SOURCES:
        raise UsageError(f"--source must be one of {', '.join(core.SOURCES)}, not {source!r}",
                         hint="e.g. --source local")
    if temperature is not None and not 0 <= temperature <= 2:
        raise UsageError(f"--temperature {temperature:g} is out of range", hint="use a value from 0 to 2")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens {max_tokens} must be at least 1", hint="e.g. --max-tokens 512")
    stdin_tty = sys.stdin.isatty()
    if prompt is not None:
        if not prompt.strip():
            raise UsageError("-p/--prompt is empty", hint="e.g. sage-llm chat -p 'Hello'")
        text: str | None = prompt
    elif interactive or stdin_tty:
        text = None
    else:
        text = sys.stdin.read()
        if not text.strip():
            raise UsageError("no prompt: stdin was empty", hint="pipe some text in, or pass -p TEXT")
    if json_ and text is None:
        raise UsageError("--json needs one prompt (-p TEXT or text on stdin), not an interactive chat",
                         hint="e.g. sage-llm chat -p 'Hello' --json")

    target_ = core.resolve(source, target, model)
    out.info(target_.describe())
    session = core.ChatSession(target=target_, source_mode=source, system=system, temperature=temperature,
                               max_tokens=max_tokens, stream=not no_stream, model_override=model)
    try:
        if text is not None:
            _one_shot(session, text, json_, plain)
        else:
            _repl(session, plain, tty=stdin_tty and not interactive)
    finally:
        session.close()


def _ask(session: Any, text: str, json_: bool, plain: bool) -> Any:
    holder = [make_renderer(json_, plain)]

    def notice(msg: str) -> None:
        holder[0].finish()
        out.warning(msg)
        holder[0] = make_renderer(json_, plain)

    try:
        turn = session.ask(text, lambda piece: holder[0].feed(piece), notice)
    finally:
        holder[0].finish()
    return turn


def _one_shot(session: Any, text: str, json_: bool, plain: bool) -> None:
    turn = _ask(session, text, json_, plain)
    if json_:
        r = turn.result
        out.print_json({
            "text": turn.text, "model": r.model or turn.target.model, "source": turn.target.source,
            "base_url": turn.target.base_url, "usage": r.usage,
            "ttft_s": None if r.ttft_s is None else round(r.ttft_s, 4),
            "tokens_per_s": None if r.tokens_per_s is None else round(r.tokens_per_s, 2),
        })
    else:
        out.info(turn.stats.line())


def _repl(session: Any, plain: bool, tty: bool) -> None:
    from sage_llm.chat.session import run_chat

    save = _setup_history() if tty else (lambda: None)
    read_line = _line_reader(tty)
    if tty:
        out.info("Type /help for commands, Ctrl-D or /exit to leave.")

    def send(text: str) -> None:
        turn = _ask(session, text, False, plain)
        out.info(turn.stats.line())

    try:
        run_chat(read_line, send, out.info, session, prompt="> " if tty else "")
    finally:
        save()
