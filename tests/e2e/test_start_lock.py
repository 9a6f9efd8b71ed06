"""A second `start` that waits on a loading engine must not hold the state lock while it waits (issue 12, §2).

With the lock held across the wait, every `stop` and every other `start` queued behind the load (up to --timeout),
`stop` of that very engine included.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from sage_llm.core.errors import EngineFailed
from sage_llm.core.state import StateStore
from sage_llm.engine import manager
from sage_llm.engine.vllm import LaunchSpec
from tests.conftest import free_port

LOAD_S = "60"  # longer than the joins below: on the old code the load outlasts them, so they fail, not hang


def _spec(model: str) -> LaunchSpec:
    return LaunchSpec(model=model, host="127.0.0.1", port=free_port(), gpu_memory_utilization=0.9)


class _Call(threading.Thread):
    """Run `fn` in a thread; keep its result or exception."""

    def __init__(self, fn: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the test
            self.error = exc


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_stop_and_other_starts_do_not_queue_behind_a_second_start_waiting_on_a_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", LOAD_S)
    store = StateStore()
    first = manager.start(_spec("org/slow"), name="slow", wait=False, store=store)
    assert first.record.pid

    waiting = threading.Event()
    second = _Call(lambda: manager.start(_spec("org/slow"), wait=True, timeout=600, store=store,
                                         on_progress=lambda _ev: waiting.set()))
    second.start()
    # on_progress is called from inside the wait: from here on the second start is waiting on the load
    assert waiting.wait(60), f"the second start never began waiting ({second.error!r})"
    assert second.is_alive()

    other = _Call(lambda: manager.start(_spec("org/other"), name="other", wait=False, store=store))
    other.start()
    other.join(30)
    assert not other.is_alive(), "a start of another model queued behind the load"
    assert other.error is None, other.error

    stop = _Call(lambda: manager.stop("slow", timeout=10, store=store))
    stop.start()
    stop.join(45)
    assert not stop.is_alive(), "stop of the loading engine queued behind the second start's wait"
    assert stop.error is None, stop.error
    assert stop.result.stopped
    assert not stop.result.already_gone
    assert store.load("slow") is None

    # the waiting start sees its engine go and fails (it never kills: kill_on_fail=False), instead of waiting on
    second.join(30)
    assert not second.is_alive()
    assert isinstance(second.error, EngineFailed), second.error
    assert "exited during startup" in str(second.error)
