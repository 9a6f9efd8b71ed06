"""`sage llm run`: start an engine in the foreground, show its load, then stream its log until Ctrl-C.

Same options, checks and launch path as `start` (it calls start's `launch()` and so `manager.start(...,
foreground=True, wait=True)`). While it runs the engine is recorded like any other, so `status`, `logs`, `chat` and
`stop NAME` from another terminal see it; `stop NAME` from elsewhere ends `run` cleanly. Ctrl-C, SIGTERM or SIGHUP to
`run` stop the engine's whole process group and remove its record. If `run` itself is SIGKILLed the engine keeps
running *recorded* (it lives in its own session): `status` shows it, marked as orphaned, and `stop NAME` cleans it up.
See docs/logs-and-run.md.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_llm.cli import _output as out
from sage_llm.cli._launch import ExtraArg, ModelArg, launch_options
from sage_llm.cli.commands import start as start_cmd

if TYPE_CHECKING:
    from sage_llm.api import LaunchRequest

EPILOG = ("Examples: sage llm run Qwen/Qwen2.5-7B-Instruct --port 8001 | sage llm run ./my-model --max-model-len 4096 "
          "| sage llm run MODEL -- --enable-prefix-caching   (Ctrl-C stops the engine)")


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP to `run`: handled like Ctrl-C."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Terminated(signal.Signals(signum).name)


@launch_options("start")
def run(launch: LaunchRequest, model: ModelArg = None, vllm_args: ExtraArg = None) -> None:
    """Run a vLLM engine in the foreground: show its load, then stream its log; Ctrl-C stops it.

    Takes every `start` option. The engine is recorded while it runs, so `status`, `logs`, `chat` and `stop NAME`
    work from other terminals."""
    _run(launch)


def _run(launch: LaunchRequest) -> None:
    from sage_llm import api
    from sage_llm import logs as logtools
    from sage_llm.errors import EngineFailed, SageLLMError
    from sage_llm.state import EngineRecord, StateStore

    launch.wait = True
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    store = StateStore()
    rec: EngineRecord | None = None
    settled = False  # the engine is gone, or was stopped from elsewhere: nothing left for `run` to stop
    try:
        try:
            result = start_cmd.launch_and_show(launch, foreground=True)
        except KeyboardInterrupt:
            _stop_own(store, why="interrupted while loading")
            raise SystemExit(130) from None
        except SageLLMError:
            raise  # refused (nothing started) or failed (manager already stopped it and kept the record)
        except BaseException:
            _stop_own(store, why="run failed while loading")
            raise
        rec = result.record
        took = f" in {result.ready_after_s:.1f} s" if result.ready_after_s is not None else ""
        out.info(f"engine {rec.name!r} ready{took}: {rec.served_model_name} at {rec.base_url} (pid {rec.pid})")
        out.info(f"streaming its log; Ctrl-C stops the engine (from elsewhere: sage llm chat {rec.name} | "
                 f"sage llm stop {rec.name})")
        target = logtools.LogTarget(rec.name, Path(rec.log_file), rec)
        ended = logtools.engine_ended(target, store)
        for ev in logtools.follow(target.path, stop=ended, poll=0.1, check_every=0.5):
            if ev.kind == "line":
                out.result(ev.text)
            elif ev.kind == "notice":
                out.info(f"-- {ev.text}")
            else:
                settled = True
                out.info(f"-- {ev.text}")
                current = store.load(rec.name)
                if isinstance(current, EngineRecord) and current.id == rec.id:
                    # it died by itself: leave the record (status explains it) and fail like `start` does
                    view_error = api.explain_exit(rec)
                    raise EngineFailed(f"engine {rec.name!r} exited" + (f": {view_error}" if view_error else ""),
                                       hint=f"sage llm logs {rec.name} -n 80")
                return  # stopped from another terminal
    except KeyboardInterrupt as exc:
        if rec is None:
            raise
        why = f"{exc.args[0]} received" if isinstance(exc, _Terminated) and exc.args else "Ctrl-C"
        if not _stop(rec, store, why):
            raise SystemExit(1) from None
    except BrokenPipeError:
        # stdout was closed (e.g. `sage llm run M | head`): the foreground is over, so the engine goes too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if rec is not None and not settled:
            _stop(rec, store, "stdout closed")
    except BaseException:
        if rec is not None and not settled:
            _stop(rec, store, "run failed")
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop(rec: Any, store: Any, why: str) -> bool:
    """Stop the foreground engine (whole process group, record removed); True when nothing of it is left."""
    from sage_llm import api

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the stop finish; it escalates to SIGKILL by itself
    out.info(f"-- {why}: stopping engine {rec.name!r}")
    outcome = api.stop(rec.name, store=store)
    if outcome.stopped:
        out.info(f"-- {outcome.message}")
        return True
    out.error(outcome.message)
    return False


def _stop_own(store: Any, why: str) -> None:
    """Stop the engine this process launched (found by its owner pid: the launch did not return a record)."""
    from sage_llm import api

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rec = api.find_foreground_engine(os.getpid(), store)
    if rec is not None:
        out.info(f"-- {why}: stopping engine {rec.name!r}")
        outcome = api.stop(rec.name, store=store)
        out.info(f"-- {outcome.message}")
