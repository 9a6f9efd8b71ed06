"""The chat REPL in a real pseudo-terminal: Markdown on, Ctrl-C cancels the reply (the server sees the disconnect)
and keeps the session, Ctrl-D exits 0, and the line history is saved in the state directory."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakes.fake_openai import FakeOpenAI
from tests.support.discipline import wait_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")
SAGE_LLM = Path(sys.executable).parent / "sage-llm"


class Terminal:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import fcntl
        import pty
        import struct
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.raw = b""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def expect(self, pattern: str, timeout: float = 30.0, start: int = 0) -> int:
        """Read until `pattern` (a regex) appears in the text after `start`; returns the end of the match."""
        end = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text[start:])
            if m:
                return start + m.end()
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen in:\n{self.text[start:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:
                    time.sleep(0.05)

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


@pytest.fixture
def api():
    with FakeOpenAI(key="sk-term", models=("cloud-model",), reply="Hello from the **cloud**.") as a:
        yield a


@pytest.mark.timeout(120)
def test_repl_in_a_terminal(api: FakeOpenAI, home: Path) -> None:
    env = dict(os.environ)
    env.update({"SAGE_CHAT_BASE_URL": api.base_url, "SAGE_CHAT_API_KEY": "sk-term", "SAGE_CHAT_MODEL": "cloud-model",
                "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"})
    env.pop("NO_COLOR", None)
    t = Terminal([str(SAGE_LLM), "chat", "--source", "cloud"], env)
    try:
        pos = t.expect(r"Type /help for commands")
        pos = t.expect(r"> ", start=pos)
        api.tokens = [f"w{i} " for i in range(400)]
        api.delay_s = 0.02
        t.send("count for me\r")
        pos = t.expect(r"w5 ", start=pos)
        os.kill(t.proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process
        pos = t.expect(r"\[reply cancelled\]", start=pos)
        wait_for(lambda: api.disconnects, 30, what="the server to see the request dropped")
        assert api.disconnects == 1  # the request was dropped, not left to run to its end
        assert "completion tokens" not in t.text  # no stats line for a cancelled reply

        api.tokens, api.delay_s = None, 0.0
        pos = t.expect(r"> ", start=pos)
        t.send("hi\r")
        pos = t.expect(r"Hello from the cloud\.", start=pos)  # rendered: the ** are gone
        pos = t.expect(r"ttft [\d.]+ s · .* completion tokens", start=pos)
        # the cancelled turn is not in the history sent to the server
        assert [m["content"] for m in api.requests[-1]["messages"]] == ["hi"]

        pos = t.expect(r"> ", start=pos)  # back at the prompt before Ctrl-D
        t.send("\x04")  # Ctrl-D
        assert t.proc.wait(60) == 0
    finally:
        t.close()
    history = (home / "chat_history").read_text().splitlines()
    assert history[-2:] == ["count for me", "hi"]
    assert (home / "chat_history").stat().st_mode & 0o777 == 0o600
