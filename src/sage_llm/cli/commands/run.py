"""`sage llm run`: start an engine in the foreground, show its load, then stream its log until Ctrl-C.

Same options, checks and launch path as `start` (it calls start's `launch()` and so `manager.start(...,
foreground=True, wait=True)`). While it runs the engine is recorded like any other, so `status`, `logs`, `chat` and
`stop NAME` from another terminal see it; `stop NAME` from elsewhere ends `run` cleanly. Ctrl-C, SIGTERM or SIGHUP to
`run` stop the engine's whole process group and remove its record; once that stop has begun it runs to the end,
whatever signals arrive (cli/_signals.py: handlers only record them). If `run` itself is SIGKILLed the engine keeps
running *recorded* (it lives in its own session): `status` shows it, marked as orphaned, and `stop NAME` cleans it up.
See docs/logs-and-run.md.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sage_llm.cli import _output as out
from sage_llm.cli import _signals
from sage_llm.cli.commands import start as start_cmd

EPILOG = ("Examples: sage llm run Qwen/Qwen2.5-7B-Instruct --port 8001 | sage llm run ./my-model --max-model-len 4096 "
          "| sage llm run MODEL -- --enable-prefix-caching   (Ctrl-C stops the engine)")
_DROPPED = ("wait", "json_")


def _why(exc: BaseException) -> str:
    """"Ctrl-C" for SIGINT, "SIGTERM received" / "SIGHUP received" for the others."""
    if isinstance(exc, _signals.Interrupted) and exc.args and exc.args[0] != signal.SIGINT.name:
        return f"{exc.args[0]} received"
    return "Ctrl-C"


def _run(**params: Any) -> None:
    from sage_llm import logs as logtools
    from sage_llm import settings
    from sage_llm.errors import EngineFailed, SageLLMError
    from sage_llm.state import EngineRecord, StateStore

    params.update(wait=True, json_=False)
    stop_timeout = settings.get("stop_timeout")  # resolved up front: a bad value is refused before anything starts
    # SIGINT, SIGTERM and SIGHUP only set a flag; `sigs.check()` acts on it where `run` can (during the load, between
    # log lines). Never raised in the middle of a step, they cannot abort a stop halfway.
    sigs = _signals.Signals().start()
    store = StateStore()
    rec: EngineRecord | None = None
    settled = False  # the engine is gone, or was stopped from elsewhere: nothing left for `run` to stop
    try:
        try:
            result = start_cmd.launch(params, foreground=True, checkpoint=sigs.check)
            sigs.check()  # a signal in the last moments of the load
        except KeyboardInterrupt:
            _stop_own(store, stop_timeout, why="interrupted while loading")
            raise SystemExit(130) from None
        except SageLLMError:
            raise  # refused (nothing started) or failed (manager already stopped it and kept the record)
        except BaseException:
            _stop_own(store, stop_timeout, why="run failed while loading")
            raise
        rec = result.record
        took = f" in {result.ready_after_s:.1f} s" if result.ready_after_s is not None else ""
        out.info(f"engine {rec.name!r} ready{took}: {rec.served_model_name} at {rec.base_url} (pid {rec.pid})")
        out.info(f"streaming its log; Ctrl-C stops the engine (from elsewhere: sage llm chat {rec.name} | "
                 f"sage llm stop {rec.name})")
        target = logtools.LogTarget(rec.name, Path(rec.log_file), rec)
        ended = logtools.engine_ended(target, store)
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
                if isinstance(current, EngineRecord) and current.id == rec.id:
                    # it died by itself: leave the record (status explains it) and fail like `start` does
                    view_error = _explain(rec)
                    raise EngineFailed(f"engine {rec.name!r} exited" + (f": {view_error}" if view_error else ""),
                                       hint=f"sage llm logs {rec.name} -n 80")
                return  # stopped from another terminal
    except KeyboardInterrupt as exc:
        if rec is None:
            raise
        if not _stop(rec, store, _why(exc), stop_timeout):
            raise SystemExit(1) from None
    except BrokenPipeError:
        # stdout was closed (e.g. `sage llm run M | head`): the foreground is over, so the engine goes too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if rec is not None and not settled:
            _stop(rec, store, "stdout closed", stop_timeout)
    except BaseException:
        if rec is not None and not settled:
            _stop(rec, store, "run failed", stop_timeout)
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


def _stop(rec: Any, store: Any, why: str, timeout: float) -> bool:
    """Stop the foreground engine (whole process group, record removed); True when nothing of it is left.

    Runs to the end whatever signals arrive: `run`'s handlers only record them (it escalates to SIGKILL by itself)."""
    from sage_llm.engine import manager

    _say(f"-- {why}: stopping engine {rec.name!r}; {IGNORING}")
    outcome = manager.stop(rec.name, timeout=timeout, store=store)
    if outcome.stopped:
        _say(f"-- {outcome.message}")
        return True
    out.error(outcome.message)
    return False


def _explain(rec: Any) -> str | None:
    from sage_llm.diagnose import diagnose
    from sage_llm.logs import run_lines

    d = diagnose(run_lines(rec.log_file), {"port": rec.port, "model": rec.model, "name": rec.name})
    return f"{d.message} (hint: {d.hint})" if d and d.hint else (d.message if d else None)


def _stop_own(store: Any, timeout: float, why: str) -> None:
    """Stop the engine this process launched (found by its owner pid: the launch did not return a record)."""
    from sage_llm.engine import manager
    from sage_llm.state import EngineRecord

    for name in store.names():
        rec = store.load(name)
        if isinstance(rec, EngineRecord) and rec.foreground and rec.owner_pid == os.getpid():
            _say(f"-- {why}: stopping engine {rec.name!r}; {IGNORING}")
            outcome = manager.stop(rec.name, timeout=timeout, store=store)
            _say(f"-- {outcome.message}")


def _make() -> Any:
    sig = inspect.signature(start_cmd.start, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name not in _DROPPED]

    @functools.wraps(start_cmd.start)
    def run(**kwargs: Any) -> None:
        _run(**kwargs)

    run.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {k: v for k, v in start_cmd.start.__annotations__.items() if k not in _DROPPED}
    run.__doc__ = ("Run a vLLM engine in the foreground: show its load, then stream its log; Ctrl-C stops it.\n\n"
                   "Takes every `start` option. The engine is recorded while it runs, so `status`, `logs`, `chat` and "
                   "`stop NAME` work from other terminals.")
    return run


run = _make()
