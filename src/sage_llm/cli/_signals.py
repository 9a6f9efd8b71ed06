"""The CLI's one signal idiom: a handler only records the signal and writes a byte to a self-pipe.

Nothing is raised from inside a signal handler, so a signal can never abort a half-done step (a record being written,
an engine being stopped, Rich drawing the screen). The command looks at `received` or waits on `fd` (select) at the
points where it can act, and `check()` turns a received signal into `Interrupted` there. Used by `run` and `top`.
"""

from __future__ import annotations

import os
import signal
from types import TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised by `Signals.check()` at a point where the command can act on it. args[0]: its name."""


class Signals:
    """Context manager: while active, SIGINT, SIGTERM and SIGHUP only set `received` and wake `fd`."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None  # the first one
        self.count = 0  # how many arrived in all
        self.fd = -1
        self._w = -1
        self._previous: dict[signal.Signals, Any] = {}

    def start(self) -> Signals:
        """Install the handlers (the previous ones come back on `close()`)."""
        self.fd, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.signals}
        return self

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self._w)
            self.fd = self._w = -1

    def __enter__(self) -> Signals:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(signum)
        try:
            os.write(self._w, b"!")
        except OSError:  # the pipe is full: it is awake already
            pass

    def sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, woken at once by a signal; then `check()`."""
        import select

        if self.received is None:
            select.select([self.fd], [], [], seconds)
        self.check()

    def check(self) -> None:
        """Raise Interrupted if a signal has arrived."""
        if self.received is not None:
            raise Interrupted(self.received.name)
