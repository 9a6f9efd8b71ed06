"""The CLI's one signal idiom (cli/_signals.py): handlers record and wake, never raise; `check()` raises."""

from __future__ import annotations

import os
import signal
import time

import pytest

from sage_llm.cli import _signals


def test_a_signal_is_recorded_not_raised_until_check() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with _signals.Signals() as sigs:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0)  # handlers run here; nothing is raised
        assert sigs.received == signal.SIGTERM
        assert sigs.count == 2
        assert os.read(sigs.fd, 16)  # the self-pipe woke
        with pytest.raises(_signals.Interrupted) as info:
            sigs.check()
        assert info.value.args == ("SIGTERM",)
        assert isinstance(info.value, KeyboardInterrupt)  # handled wherever Ctrl-C is
    assert signal.getsignal(signal.SIGTERM) == before


def test_sleep_wakes_at_once_on_a_signal() -> None:
    with _signals.Signals() as sigs:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        try:
            signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
            started = time.monotonic()
            with pytest.raises(_signals.Interrupted):
                sigs.sleep(30)
            assert time.monotonic() - started < 25
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
