"""`sage-llm gateway start | stop | status`: the detached gateway and its record, `gateway.json` in the state
directory (0600, written atomically like engine records). Stdlib + our own modules only: `status --json` reads the
record through `record_status()` and must not import the gateway's HTTP stack."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sage_llm.core.errors import SageLLMError, UsageError

RECORD = "gateway.json"
PROCESS_TITLE = ("sage-llm", "gateway")  # words of the detached gateway's command line (see start())


def record_path(root: Path | None = None) -> Path:
    from sage_llm.core import paths

    return (root or paths.home()) / RECORD


def load_record(root: Path | None = None) -> dict[str, Any] | None:
    try:
        data = json.loads(record_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(rec: dict[str, Any]) -> bool:
    from sage_llm.engine import process

    return process.leader(rec.get("pid"), rec.get("create_time")) is not None


def _health_tls(host: str, port: int, timeout: float, headers: dict[str, str]) -> int | None:
    """GET /health over HTTPS (--tls-cert): is our own process up, not who it is, so the certificate (often
    self-signed) is not verified."""
    import http.client
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", "/health", headers=headers)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _health(host: str, port: int, timeout: float = 1.0) -> int | None:
    """GET /health of the gateway on the probes' raw-socket client (with its key when it has one)."""
    import time

    from sage_llm.core.addresses import reachable_host
    from sage_llm.observe.probe import http_get

    headers = {}
    rec = load_record()
    key_env = (rec.get("options") or {}).get("api_key_env") if rec else None
    if key_env and os.environ.get(key_env):
        headers["Authorization"] = f"Bearer {os.environ[key_env]}"
    if rec and (rec.get("options") or {}).get("tls_cert"):
        return _health_tls(reachable_host(host), port, timeout, headers)
    try:
        status, _body = http_get(reachable_host(host), port, "/health", time.monotonic() + timeout, headers)
    except (OSError, ValueError):  # refused, timeout, or not HTTP
        return None
    return status


def record_status(root: Path | None = None, probe: bool = False, nodes: bool = False) -> dict[str, Any] | None:
    """The gateway as `status --json` shows it: None when no gateway is recorded. With `nodes`, a running gateway
    with a cluster also gets `cluster`: its nodes and their free resources as Ray sees them (engine/cluster.py
    nodes_view: Ray is imported then, and only then)."""
    rec = load_record(root)
    if rec is None:
        return None
    alive = _alive(rec)
    out = {"running": alive, "pid": rec.get("pid"), "host": rec.get("host"), "port": rec.get("port"),
           "url": rec.get("url"), "started_at": rec.get("started_at"), "log_file": rec.get("log_file")}
    if probe and alive:
        out["healthy"] = _health(rec.get("host", "127.0.0.1"), int(rec.get("port") or 0)) == 200
    address = (rec.get("options") or {}).get("cluster")
    if nodes and alive and address:
        from sage_llm.engine import cluster

        out["cluster"] = cluster.nodes_view(str(address))
    return out


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
