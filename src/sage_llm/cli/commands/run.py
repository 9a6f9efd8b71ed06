"""`sage-llm run`: start an engine in the foreground, show its load, then stream its log until Ctrl-C.

Same options, checks and launch path as `start` (start's `launch_and_show()`, so `api.start(...,
foreground=True)` with wait). While it runs the engine is recorded like any other, so `status`, `logs`, `chat` and
`stop NAME` from another terminal see it; `stop NAME` from elsewhere ends `run` cleanly. Ctrl-C, SIGTERM or SIGHUP to
`run` stop the engine's whole process group and remove its record; once that stop has begun it runs to the end,
whatever signals arrive (cli/_signals.py: handlers only record them). If `run` itself is SIGKILLed the engine keeps
running *recorded* (it lives in its own session): `status` shows it, marked as orphaned, and `stop NAME` cleans it up.
See docs/logs-and-run.md.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from sage_llm.api import LaunchRequest  # at run time: the signature's annotations are resolved (cli/_launch.py)
from sage_llm.cli import _output as out
from sage_llm.cli import _signals
from sage_llm.cli._launch import ExtraArg, ModelArg, launch_options
from sage_llm.cli.commands import start as start_cmd

EPILOG = ("Examples: sage-llm run Qwen/Qwen2.5-7B-Instruct --port 8001 | sage-llm run ./my-model --max-model-len 4096 "
          "| sage-llm run MODEL -- --enable-prefix-caching   (Ctrl-C stops the engine)")


def _why(exc: BaseException) -> str:
    """"Ctrl-C" for SIGINT, "SIGTERM received" / "SIGHUP received" for the others."""
    if isinstance(exc, _signals.Interrupted) and exc.args and exc.args[0] != signal.SIGINT.name:
        return f"{exc.args[0]} received"
    return "Ctrl-C"


@launch_options("start")
def run(launch: LaunchRequest, model: ModelArg = None, vllm_args: ExtraArg = None) -> None:
    """Run a vLLM engine in the foreground: show its load, then stream its log; Ctrl-C stops it.

    Takes every `start` option. The engine is recorded while it runs, so `status`, `logs`, `chat` and `stop NAME`
    work from other terminals."""
    _run(launch)


def _run(launch: LaunchRequest) -> None:
    from sage_llm import api
    from sage_llm.core.errors import EngineFailed, SageLLMError
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import logtarget
    from sage_llm.observe import logs as logtools

    launch.wait = True
    grace = api.stop_grace()  # resolved up front: a bad SAGE_LLM_STOP_TIMEOUT is refused before anything starts
    # SIGINT, SIGTERM and SIGHUP only set a flag; `sigs.check()` acts on it where `run` can (during the load, between
    # log lines). Never raised in the middle of a step, they cannot abort a stop halfway.
    sigs = _signals.Signals().start()
    store = StateStore()
    rec: EngineRecord | None = None
    settled = False  # the engine is gone, or was stopped from elsewhere: nothing left for `run` to stop
    try:
        try:
            result = start_cmd.launch_and_show(launch, foreground=True, checkpoint=sigs.check)
            sigs.check()  # a signal in the last moments of the load
        except KeyboardInterrupt:
            _stop_own(store, grace, why="interrupted while loading")
            raise SystemExit(130) from None
        except SageLLMError:
            raise  # refused (nothing started) or failed (manager already stopped it and kept the record)
        except BaseException:
            _stop_own(store, grace, why="run failed while loading")
            raise
        rec = result.record
        took = f" in {result.ready_after_s:.1f} s" if result.ready_after_s is not None else ""
        out.info(f"engine {rec.name!r} ready{took}: {rec.served_model_name} at {rec.base_url} (pid {rec.pid})")
        out.info(f"streaming its log; Ctrl-C stops the engine (from elsewhere: sage-llm chat {rec.name} | "
                 f"sage-llm stop {rec.name})")
        target = logtarget.LogTarget(rec.name, Path(rec.log_file), rec)
        ended = logtarget.engine_ended(target, store)
        for ev in logtools.follow(target.path, stop=ended, poll=0.1, check_every=0.5, sleep=sigs.sleep):
            sigs.check()
            if ev.kind == "line":
                out.result(ev.text)
            elif ev.kind == "notice":
                out.info(f"-- {ev.text}")
            else:
                settled = True
                out.info(f"-- {ev.text}")
                current = store.load(rec.name)
                # `sage-llm stop` from elsewhere marks the record "stopping" before its signal and removes it once
                # nothing is left: an engine gone with its record still there in that state was stopped, not dead
                if isinstance(current, EngineRecord) and current.id == rec.id and current.state != "stopping":
                    # it died by itself: leave the record (status explains it) and fail like `start` does
                    view_error = api.explain_exit(rec)
                    raise EngineFailed(f"engine {rec.name!r} exited" + (f": {view_error}" if view_error else ""),
                                       hint=f"sage-llm logs {rec.name} -n 80")
                return  # stopped from another terminal
    except KeyboardInterrupt as exc:
        if rec is None:
            raise
        if not _stop(rec, store, _why(exc), grace):
            raise SystemExit(1) from None
    except BrokenPipeError:
        # stdout was closed (e.g. `sage-llm run M | head`): the foreground is over, so the engine goes too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if rec is not None and not settled:
            _stop(rec, store, "stdout closed", grace)
    except BaseException:
        if rec is not None and not settled:
            _stop(rec, store, "run failed", grace)
        raise
    finally:
        sigs.close()


IGNORING = "further signals are ignored until it is down"


def _say(text: str) -> None:
    """Progress of a stop: a terminal that went away (SIGHUP) must not abort the stop on a failed write."""
    try:
        out.info(text)
    except OSError:
        pass


def _stop(rec: Any, store: Any, why: str, grace: float) -> bool:
    """Stop the foreground engine (whole process group, record removed); True when nothing of it is left.

    Runs to the end whatever signals arrive: `run`'s handlers only record them (it escalates to SIGKILL by itself)."""
    from sage_llm import api

    _say(f"-- {why}: stopping engine {rec.name!r}; {IGNORING}")
    outcome = api.stop(rec.name, timeout=grace, store=store)
    if outcome.stopped:
        _say(f"-- {outcome.message}")
        return True
    out.error(outcome.message)
    return False


def _stop_own(store: Any, grace: float, why: str) -> None:
    """Stop the engine this process launched (found by its owner pid: the launch did not return a record)."""
    from sage_llm import api

    rec = api.find_foreground_engine(os.getpid(), store)
    if rec is not None:
        _say(f"-- {why}: stopping engine {rec.name!r}; {IGNORING}")
        outcome = api.stop(rec.name, timeout=grace, store=store)
        _say(f"-- {outcome.message}")
