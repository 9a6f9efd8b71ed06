"""`sage-llm gateway start | stop | status`: the detached gateway and its record, `gateway.json` in the state
directory (0600, written atomically like engine records). Stdlib + our own modules only: `status --json` reads the
record through `record_status()` and must not import the gateway's HTTP stack."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from sage_llm.core.errors import SageLLMError, UsageError
from sage_llm.engine.gateway_record import alive as _alive
from sage_llm.engine.gateway_record import health as _health

# the record and its reading live below the gateway: `status` (engine/status.py) shows the gateway too
from sage_llm.engine.gateway_record import load_record, record_path, record_status  # noqa: F401 (`gateway status`)

PROCESS_TITLE = ("sage-llm", "gateway")  # words of the detached gateway's command line (see start())


def start(opts: Any, timeout: float = 30.0) -> dict[str, Any]:
    """Spawn `python -m sage_llm.gateway sage-llm gateway --options JSON` detached (its own session), record it, wait
    for /health. The words `sage-llm gateway` are in its command line for the tools that find it there (SAGE Studio's
    `sage studio stop --stop-llm`, `pgrep -f "sage-llm gateway"`)."""
    from sage_llm.core import paths
    from sage_llm.core.state import StateStore, atomic_write_json, utcnow_iso
    from sage_llm.engine import process

    store = StateStore()
    with store.lock():
        rec = load_record()
        if rec is not None and _alive(rec):
            raise UsageError(f"a gateway already runs (pid {rec['pid']}) on {rec.get('url')}",
                             hint="`sage-llm gateway stop` stops it")
        if not process.port_is_free(opts.host, opts.port):
            pid, pname = process.port_owner(opts.port)
            who = f" by {pname} (pid {pid})" if pid else ""
            raise UsageError(f"port {opts.port} is already in use{who}", hint="pass another --port")
        paths.ensure_home(store.root)
        store.logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_file = store.logs / "gateway.log"
        argv = [sys.executable, "-m", "sage_llm.gateway", *PROCESS_TITLE, "--options", json.dumps(opts.to_json())]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        spawned = process.spawn(argv, env, log_file)
        host = opts.host if ":" not in opts.host else f"[{opts.host}]"
        rec = {"pid": spawned.pid, "create_time": spawned.create_time, "host": opts.host, "port": opts.port,
               "url": f"{opts.scheme}://{host}:{opts.port}/v1", "started_at": utcnow_iso(), "log_file": str(log_file),
               "options": opts.to_json()}
        atomic_write_json(record_path(store.root), rec)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if spawned.popen.poll() is not None:
            record_path().unlink(missing_ok=True)
            from sage_llm.observe import logs as logtools

            tail = [ln for ln in logtools.run_lines(str(log_file))[-5:] if ln.strip()]
            raise SageLLMError(f"the gateway exited at start (code {spawned.popen.returncode})"
                               + (f": {tail[-1].strip()}" if tail else ""), hint=f"see {log_file}")
        if _health(opts.host, opts.port, 0.5) == 200:
            return rec
        time.sleep(0.1)
    raise SageLLMError(f"the gateway did not answer /health within {timeout:g} s", hint=f"see {log_file}")


def stop(timeout: float = 60.0) -> str:
    """SIGTERM the recorded gateway (it stops the engines it started), SIGKILL after `timeout`; remove the record."""
    from sage_llm.core.state import StateStore
    from sage_llm.engine import process

    rec = load_record()
    if rec is None:
        return "no gateway is running"
    if not _alive(rec):
        record_path().unlink(missing_ok=True)
        return f"the gateway (pid {rec.get('pid')}) was not running; record removed"
    result = process.stop_tree(rec["pid"], rec.get("create_time"), None, timeout=timeout)
    if result.survivors:
        raise SageLLMError(f"the gateway (pid {rec['pid']}) survived SIGKILL", hint="check `ps` for it")
    with StateStore().lock():
        record_path().unlink(missing_ok=True)
    how = " (SIGKILL after the grace period)" if result.escalated else ""
    return f"stopped the gateway (pid {rec['pid']}){how} in {result.duration_s:.2f} s"
